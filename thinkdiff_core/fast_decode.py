"""The fast decode engine: transformers does the prefill, a static-cache loop of our own does the decode steps.

Why: `generate` re-enters Python for every layer of every token, and its dynamic KV cache changes shape each step,
so on a GPU a 7B VLM spends most of a step launching kernels rather than reading weights. Here:

- The prefill (vision tower, M-RoPE positions, the prompt's KV cache) stays with transformers' `generate`, run for
  one token, so every model version and layout it supports is handled by transformers itself.
- Its KV cache is copied into preallocated buffers whose length is rounded up to a bucket (`cache_bucket`), and the
  remaining tokens are decoded by a step written against the weights of the Qwen2 decoder (the same operations, in
  the same dtypes, as transformers' layers). The step sees no prompt length: lengths live in buffer contents (a mask
  and a position per row), so a new prompt length reuses everything that was compiled or captured.
- On CUDA the two halves of a decoder layer are `torch.compile`d once (regional compilation: every layer reuses the
  same compiled code, so the first call stays short) and the whole step is captured as one CUDA graph per
  (batch, bucket). A step is then one graph launch, with no host synchronisation between tokens. Batches run padded
  to a power of two, so shrinking batches compile for a handful of sizes. If compiling fails (no Triton, say), or
  capture does, the same step runs uncompiled or uncaptured, with a warning.
- Text positions after the prompt are 1-D (M-RoPE's three components are equal there), so the step applies plain
  RoPE at position `last prompt position + 1 + k`; the prompt's last position is read from what transformers gave
  its rotary embedding during the prefill, whatever its version's M-RoPE bookkeeping.

Greedy tokens are those of `generate` up to the order of floating-point sums (the attention runs over a masked,
bucketed cache instead of the exact length): identical in the float32 tests; in bf16 a near-tie can break the other
way, which is why the benchmark compares engines on the same tokens (teacher forcing). Sampling
is seeded through a private `torch.Generator` (exponential race, as vLLM does): deterministic for a seed, but not the
same draws as `generate` for that seed.

The engine refuses (and the caller falls back to `generate`) for anything it does not reproduce exactly: models that
are not Qwen2-VL / Qwen2.5-VL, quantized weights, sliding-window attention, another activation or rope type.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)
_OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)

SUPPORTED_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")


@dataclass(frozen=True)
class FastDecodeOptions:
    """How the fast engine runs.

    compile: torch.compile the decoder layer halves (None: on CUDA only), with `compile_backend`.
    cuda_graphs: capture each decode step as a CUDA graph (None: on CUDA only).
    cache_bucket: KV-cache lengths are rounded up to a multiple of this, so prompts of similar length share a graph.
    check_every: how many tokens between host synchronisations: with stop_at_eos, to see whether every row has ended;
        with a progress callback, to keep progress and Cancel near what the GPU has done.
    max_graphs: captured graphs kept (each holds its KV cache); the least recently used goes first.
    """

    compile: bool | None = None
    cuda_graphs: bool | None = None
    cache_bucket: int = 256
    check_every: int = 16
    max_graphs: int = 2
    compile_backend: str = "inductor"


@dataclass
class DecodeResult:
    generated_ids: torch.Tensor  # (batch, tokens)
    hidden_states: torch.Tensor  # (batch, tokens - 1, hidden): the states of the decode steps, one per fed token


def unsupported_reason(model) -> str | None:
    """Why the fast engine cannot run this model exactly, or None when it can."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in SUPPORTED_MODEL_TYPES:
        return f"model type {getattr(config, 'model_type', None)!r} is not one of {SUPPORTED_MODEL_TYPES}"
    text = getattr(config, "text_config", config)
    if getattr(text, "hidden_act", "silu") != "silu":
        return f"activation {text.hidden_act!r} (only silu)"
    if getattr(text, "use_sliding_window", False):
        return "sliding-window attention"
    rope = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", "mrope"):
        return f"rope type {rope.get('rope_type')!r}"
    try:
        parts = _DecoderParts.of(model)
    except AttributeError as error:
        return f"unexpected module layout ({error})"
    for linear in parts.linears():
        if type(linear) is not torch.nn.Linear or not linear.weight.is_floating_point():
            return f"{type(linear).__name__} layers (quantized weights)"
    return None


# --- the decode step, written against the weights -------------------------------------------------------------------


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Qwen2VLRMSNorm: fp32 statistics, cast back, then the weight.
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _attention_in(x, norm_w, eps: float, wq, bq, wk, bk, wv, bv, cos, sin, heads: int, kv_heads: int):
    """Norm, q/k/v projections and RoPE for one new token per row: x (B, hidden) -> q (B, H, D), k, v (B, KVH, D)."""
    batch = x.shape[0]
    h = _rms_norm(x, norm_w, eps)
    q = F.linear(h, wq, bq).view(batch, heads, -1)
    k = F.linear(h, wk, bk).view(batch, kv_heads, -1)
    v = F.linear(h, wv, bv).view(batch, kv_heads, -1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin, v


def _attention_out(x, attn, wo, bo, norm_w, eps: float, wg, wu, wd):
    """Output projection, residual, norm, SwiGLU MLP, residual."""
    x = x + F.linear(attn, wo, bo)
    h = _rms_norm(x, norm_w, eps)
    return x + F.linear(F.silu(F.linear(h, wg)) * F.linear(h, wu), wd)


def _rope(positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float, dtype: torch.dtype):
    # As Qwen2VLRotaryEmbedding for a text position (all three M-RoPE components equal): fp32, then the model dtype.
    freqs = positions[:, None].float() * inv_freq[None, :].float()
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)


@dataclass
class _DecoderParts:
    embed: torch.nn.Embedding
    layers: list
    norm: torch.nn.Module
    lm_head: torch.nn.Linear
    rotary: torch.nn.Module

    @classmethod
    def of(cls, model) -> _DecoderParts:
        language = model.model.language_model if hasattr(model.model, "language_model") else model.model
        return cls(language.embed_tokens, list(language.layers), language.norm, model.lm_head, language.rotary_emb)

    def linears(self):
        for layer in self.layers:
            attn, mlp = layer.self_attn, layer.mlp
            yield from (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        yield self.lm_head

    def fingerprint(self) -> tuple:
        """Where the weights live now: a captured graph is only valid while none of them has moved."""
        tensors = [self.embed.weight, self.norm.weight, self.lm_head.weight, self.rotary.inv_freq]
        for layer in self.layers:
            tensors += [layer.input_layernorm.weight, layer.post_attention_layernorm.weight]
        tensors += [linear.weight for linear in self.linears()]
        tensors += [linear.bias for linear in self.linears() if linear.bias is not None]
        return tuple(t.data_ptr() for t in tensors)


class _State:
    """Buffers of one (batch, cache length): KV cache, mask, the step's inputs and outputs, maybe a CUDA graph."""

    def __init__(self, parts: _DecoderParts, batch: int, cache_len: int, device, dtype) -> None:
        attn = parts.layers[0].self_attn
        kv_heads = parts.layers[0].self_attn.k_proj.out_features // attn.head_dim
        shape = (batch, kv_heads, cache_len, attn.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in parts.layers]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in parts.layers]
        self.mask = torch.zeros(batch, cache_len, device=device, dtype=torch.bool)
        self.tokens = torch.zeros(batch, device=device, dtype=torch.long)
        self.positions = torch.zeros(batch, device=device, dtype=torch.long)
        self.slot = torch.zeros(1, device=device, dtype=torch.long)
        self.hidden: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.fingerprint: tuple = ()


class FastDecoder:
    """Static-cache decoding for one loaded model. Keep it with the model (VlmBundle does) so compiled code and
    captured graphs are reused from call to call; `release()` gives their memory back."""

    def __init__(self, model, options: FastDecodeOptions = FastDecodeOptions()) -> None:
        reason = unsupported_reason(model)
        if reason:
            raise ValueError(f"the fast decode engine does not support this model: {reason}")
        self.model = model
        self.options = options
        self.parts = _DecoderParts.of(model)
        attn = self.parts.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.heads = attn.q_proj.out_features // self.head_dim
        self.kv_heads = attn.k_proj.out_features // self.head_dim
        self.scale = getattr(attn, "scaling", self.head_dim**-0.5)
        self.rope_scaling = float(getattr(self.parts.rotary, "attention_scaling", 1.0))
        self._states: OrderedDict[tuple[str, int, int], _State] = OrderedDict()
        self._compile_checked = False
        self._stream: torch.cuda.Stream | None = None  # one side stream for every capture
        self._graphs_failed = False
        self._compiled: tuple[Callable, Callable] | None = None

    # --- public -------------------------------------------------------------------------------------------------

    @property
    def compiled(self) -> bool:
        """Whether the layer halves run compiled (known after the first decode step)."""
        return self._compiled is not None and self._compiled[0] is not _attention_in

    @property
    def captured_graphs(self) -> int:
        """How many step graphs are held (one per batch size and cache bucket in use, each with its KV cache)."""
        return sum(state.graph is not None for state in self._states.values())

    def release(self) -> None:
        """Drop KV caches and captured graphs (compiled code stays; it holds no device memory)."""
        self._states.clear()

    def decode(
        self,
        first_logits: torch.Tensor,
        prompt_kv: list[tuple[torch.Tensor, torch.Tensor]],
        prompt_mask: torch.Tensor,
        first_positions: torch.Tensor,
        num_tokens: int,
        choose: Callable[[torch.Tensor, int], torch.Tensor],
        on_token: Callable[[int], None] | None = None,
        is_finished: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> DecodeResult:
        """Decode num_tokens tokens after a prefill.

        first_logits: (B, V) logits of the last prompt position; prompt_kv: per layer (keys, values) of the prompt,
        (B, KVH, L, D), emptied once copied so the prefill's cache can be freed; prompt_mask: (B, L) real prompt
        positions; first_positions: (B,) RoPE position of the first generated token; choose(logits, k) -> (B,)
        token k; is_finished(ids so far) -> (B,) bool, to stop early once every row has ended (checked every
        `check_every` tokens).

        The batch runs padded to a power of two (extra rows repeat row 0 and are dropped), so a run whose batches
        shrink (skipped pictures) compiles and captures for a handful of sizes only.
        """
        batch, prompt_len = prompt_mask.shape
        device = first_logits.device
        width = self.parts.norm.weight.shape[0]
        hidden_states = torch.empty(batch, num_tokens - 1, width, device=device, dtype=self.parts.norm.weight.dtype)
        ids = torch.empty(batch, num_tokens, device=device, dtype=torch.long)
        ids[:, 0] = choose(first_logits.float(), 0)
        if on_token is not None:
            on_token(1)
        if num_tokens == 1:
            prompt_kv.clear()
            return DecodeResult(ids, hidden_states)
        state = self._state(_padded_batch(batch), prompt_len + num_tokens, device)
        rows = _repeat_first_row(batch, state.tokens.shape[0], device)
        for layer, (keys, values) in enumerate(prompt_kv):
            state.keys[layer][:, :, :prompt_len].copy_(keys[rows])
            state.values[layer][:, :, :prompt_len].copy_(values[rows])
        prompt_kv.clear()
        state.mask.zero_()
        state.mask[:, :prompt_len].copy_(prompt_mask.bool()[rows])
        state.positions.copy_(first_positions[rows])
        state.slot.fill_(prompt_len)
        state.tokens.copy_(ids[rows, 0])
        self._check_compiled(state)
        graphed = self._graph_ready(state)
        steps = num_tokens - 1
        for k in range(1, num_tokens):
            state.tokens[:batch].copy_(ids[:, k - 1])
            if graphed:
                state.graph.replay()
                hidden, logits = state.hidden, state.logits
            else:
                hidden, logits = self._step(state)
            hidden_states[:, k - 1].copy_(hidden[:batch])
            ids[:, k] = choose(logits[:batch].float(), k)
            state.positions.add_(1)
            state.slot.add_(1)
            if on_token is not None:
                if device.type == "cuda" and k % self.options.check_every == 0:
                    torch.cuda.current_stream(device).synchronize()  # keep progress (and Cancel) near the GPU
                on_token(k + 1)
            if (
                is_finished is not None
                and k % self.options.check_every == 0
                and bool(is_finished(ids[:, : k + 1]).all())
            ):
                steps = k
                break
        return DecodeResult(ids[:, : steps + 1], hidden_states[:, :steps])

    # --- internals ----------------------------------------------------------------------------------------------

    def _state(self, batch: int, needed: int, device) -> _State:
        bucket = self.options.cache_bucket
        key = (str(device), batch, math.ceil(needed / bucket) * bucket)
        state = self._states.pop(key, None)
        if state is None:
            while len(self._states) >= self.options.max_graphs:
                self._states.popitem(last=False)
            state = _State(self.parts, batch, key[2], device, self.parts.norm.weight.dtype)
        self._states[key] = state
        return state

    def _use(self, flag: bool | None, device) -> bool:
        return device.type == "cuda" if flag is None else flag

    def _layer_functions(self, device) -> tuple[Callable, Callable]:
        if self._compiled is None:
            if self._use(self.options.compile, device):
                backend = self.options.compile_backend
                self._compiled = (_compiled(_attention_in, backend), _compiled(_attention_out, backend))
            else:
                self._compiled = (_attention_in, _attention_out)
        return self._compiled

    def _check_compiled(self, state: _State) -> None:
        """Run one step with the compiled layers before anything relies on them: compilation happens here, outside
        any graph capture, and if it fails (no Triton on this system, an unsupported GPU or Python) the engine
        falls back to the same step uncompiled instead of failing the encode. The step writes at the slot the first
        real step overwrites."""
        if self._compile_checked:
            return
        try:
            if self._layer_functions(state.tokens.device)[0] is not _attention_in:
                self._step(state)
        except _OUT_OF_MEMORY:
            raise
        except Exception as error:  # noqa: BLE001 - any compile failure: run uncompiled
            first_line = (str(error).splitlines() or [type(error).__name__])[0]
            logger.warning("compiling the decode step failed (%s); decoding uncompiled", first_line)
            self._compiled = (_attention_in, _attention_out)
        self._compile_checked = True

    def _step(self, state: _State) -> tuple[torch.Tensor, torch.Tensor]:
        """One token per row through every layer; writes its keys/values at `slot` and returns (hidden, logits)."""
        parts, device = self.parts, state.tokens.device
        attention_in, attention_out = self._layer_functions(device)
        x = F.embedding(state.tokens, parts.embed.weight)
        cos, sin = _rope(state.positions, parts.rotary.inv_freq, self.rope_scaling, x.dtype)
        state.mask.index_fill_(1, state.slot, True)
        # One additive mask per step in the model's dtype (SDPA would convert a boolean one in every layer).
        mask = torch.zeros(state.mask.shape, dtype=x.dtype, device=device).masked_fill_(~state.mask, -math.inf)
        mask = mask[:, None, None, :]
        group = self.heads // self.kv_heads
        for layer, keys, values in zip(parts.layers, state.keys, state.values):
            attn, mlp = layer.self_attn, layer.mlp
            q, k, v = attention_in(
                x, layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon,
                attn.q_proj.weight, attn.q_proj.bias, attn.k_proj.weight, attn.k_proj.bias,
                attn.v_proj.weight, attn.v_proj.bias, cos, sin, self.heads, self.kv_heads,
            )  # fmt: skip
            keys.index_copy_(2, state.slot, k[:, :, None, :])
            values.index_copy_(2, state.slot, v[:, :, None, :])
            # One query per row: the heads sharing a KV head become that head's queries (no repeat of the cache).
            out = F.scaled_dot_product_attention(
                q.view(q.shape[0], self.kv_heads, group, self.head_dim), keys, values, attn_mask=mask, scale=self.scale
            )
            x = attention_out(
                x, out.reshape(x.shape[0], -1), attn.o_proj.weight, attn.o_proj.bias,
                layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon,
                mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight,
            )  # fmt: skip
        hidden = _rms_norm(x, parts.norm.weight, parts.norm.variance_epsilon)
        return hidden, F.linear(hidden, parts.lm_head.weight, parts.lm_head.bias)

    def _graph_ready(self, state: _State) -> bool:
        """Whether this state's CUDA graph can be replayed, capturing it first if it is missing or stale (the weights
        moved since: ComfyUI evicted and reloaded the model). Checked once per decode call."""
        device = state.tokens.device
        if self._graphs_failed or device.type != "cuda" or not self._use(self.options.cuda_graphs, device):
            return False
        fingerprint = self.parts.fingerprint()
        if state.graph is None or state.fingerprint != fingerprint:
            self._capture(state, fingerprint)
        return state.graph is not None

    def _capture(self, state: _State, fingerprint: tuple) -> None:
        """Capture the step as a CUDA graph. Warm-up runs write into the cache at the current slot, which the real
        step then overwrites, and into the mask at that slot, which the real step sets anyway."""
        state.graph = None
        device = state.tokens.device
        saved = (state.tokens.clone(), state.positions.clone(), state.slot.clone())
        try:
            with torch.cuda.device(device):
                if self._stream is None:
                    self._stream = torch.cuda.Stream(device)  # reused: each new stream would keep a cuBLAS workspace
                self._stream.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(self._stream):
                    for _ in range(2):  # autotuning and allocations happen outside the capture
                        self._step(state)
                torch.cuda.current_stream(device).wait_stream(self._stream)
                graph = torch.cuda.CUDAGraph()
                # thread_local: a CUDA call from another thread (ComfyUI's server polling memory) must not break it
                with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                    state.hidden, state.logits = self._step(state)
        except _OUT_OF_MEMORY:
            raise
        except Exception as error:  # noqa: BLE001 - any capture failure means: run the same step uncaptured
            self._graphs_failed = True
            logger.warning("CUDA graph capture failed (%s); decoding without graphs", error)
            return
        finally:
            state.tokens.copy_(saved[0])
            state.positions.copy_(saved[1])
            state.slot.copy_(saved[2])
        state.graph, state.fingerprint = graph, fingerprint


def _compiled(function: Callable, backend: str) -> Callable:
    options = None
    if backend == "inductor":
        import torch._inductor.config as inductor_config

        if hasattr(inductor_config, "emulate_precision_casts"):
            # Round to bf16 between fused ops as eager does, so the step stays as close to transformers' as it can.
            options = {"emulate_precision_casts": True}
    return torch.compile(function, backend=backend, fullgraph=True, dynamic=False, options=options)


def _padded_batch(batch: int) -> int:
    return 1 << (batch - 1).bit_length()


def _repeat_first_row(batch: int, padded: int, device) -> torch.Tensor:
    """Row indices that fill a padded batch: the real rows, then row 0 again."""
    return torch.cat([torch.arange(batch, device=device), torch.zeros(padded - batch, dtype=torch.long, device=device)])
