"""GPU check: the ThinkDiff graph through the node classes, with each decode engine, on random weights of the real
shapes; the figures that decide whether the pack keeps its own decode engine. One process, one prepared run.

    bash bench/run_gpu.sh                                         # on a GPU machine: this check first, then the benches
    PYTHONPATH=.:bench python bench/gpu_check.py --out /tmp/gc    # this check alone (cuda if present)
    PYTHONPATH=.:bench python bench/gpu_check.py --tiny --device cpu --compile-backend aot_eager --out /tmp/gc
                                                                  # tiny shapes on a CPU in seconds (CI runs this)

What it does, in order (each step guarded by its own time limit under one global deadline; a failed or timed-out
step is recorded and the next one runs; the JSON is rewritten after every step):
1. env: device, driver, torch / transformers / diffusers / bitsandbytes versions.
2. build: a random-weight Qwen2-VL-7B-Instruct folder (hidden 3584, 28 layers, 28 heads / 4 KV heads, intermediate
   18944, vocab 152064, vision depth 32 / width 1280), built on the GPU in bf16 (transformers' init on the device,
   never on the CPU first) and written to local disk as safetensors, with the stand-in tokenizer and processor;
   a random ThinkDiff aligner (3584 -> 4096) in models/thinkdiff. Write speed is measured.
3. load: ThinkDiffVLMLoader and ThinkDiffAlignerLoader, standalone (no ComfyUI), models root = the temp folder.
   The loader runs once; the contenders share its weights and differ only in what the loader's engine widget sets.
4. one step per contender, each through ThinkDiffVLMEncode -> ThinkDiffConditioning (mode replace, on a base
   conditioning of ComfyUI's FLUX structure: T5 tokens (1, 256, 4096), CLIP-L pooled (1, 768), guidance 3.5):
     generate             transformers' generate, dynamic cache: the reference
     fast                 the pack's engine (static KV buffers, compiled layer halves, CUDA graphs)
     static_compile       transformers' own static cache (cache_implementation="static") under its automatic
                          torch.compile (transformers' default CompileConfig: inductor, reduce-overhead)
     fast_no_cuda_graphs  the pack's engine with CUDA graphs off
   For each: first call (compile + capture + encode), warm node time, prefill (a 1-token encode through the node),
   decode tokens/s, the conditioning node's time, peak memory, memory left allocated after the node's release; its
   greedy tokens against the reference (first divergence), and, fed the reference's tokens (teacher forcing), whether
   its own greedy picks agree up to bf16 near-ties and how far its features and conditioning are from the reference's.
5. quant_8bit, quant_4bit: the loader's 8-/4-bit loads (bitsandbytes), if importable: load time, memory, speed.
6. verdict: the issue's rule. The pack's engine stays the default only where it beats transformers' static cache by
   at least 1.5x (warm end-to-end encode node time) in the same run with matching tokens; otherwise the default
   should become transformers' path.

Writes OUT/gpu_check.json (every figure) and OUT/gpu_check.md (the BENCHMARKS.md snippet), prints the JSON's last
version as one line. Random weights: nothing is downloaded. With random weights greedy near-ties are common, so
"matching tokens" is judged by teacher forcing as in bench_vlm_encode.py (identical, or every disagreement a near-tie
within bf16 rounding, with features within bf16 tolerance).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import torch
from torch._dynamo.utils import counters

from bench_common import (
    QWEN2_VL_7B_TEXT,
    QWEN2_VL_7B_VISION,
    ForcedChoice,
    cold_compile_caches,
    qwen2vl_text,
    teacher_forced,
)

try:
    from nodes import comfy_adapter
    from nodes.conditioning import ThinkDiffConditioning
    from nodes.encode import ThinkDiffVLMEncode
    from nodes.loaders import ThinkDiffAlignerLoader, ThinkDiffVLMLoader
except ImportError as error:  # run as a script from elsewhere: nodes/ is never installed
    sys.exit(
        f"gpu_check: cannot import the pack's nodes ({error}); run it from the checkout root with PYTHONPATH=.:bench"
    )
from thinkdiff_core import GenerationSettings, save_aligner, standin
from thinkdiff_core.aligner import AlignerSpec, ThinkDiffAligner
from thinkdiff_core.capture import FinalNormCapture
from thinkdiff_core.fast_decode import FastDecodeOptions
from thinkdiff_core.generation import generate_kwargs
from thinkdiff_core.images import image_tensor_from_pil, pil_images_from_tensor
from thinkdiff_core.prompts import chat_messages, layout_content
from thinkdiff_core.vlm import model_inputs

SPEEDUP_BAR = 1.5  # the decision rule
NEAR_TIE = 2**-7  # a greedy disagreement whose margin is below this (relative to the top logit) is a bf16 near-tie
BF16_RTOL = 1.6e-2  # torch.testing's rtol for bfloat16
VLM_NAME = "qwen2-vl-7b-random"
ALIGNER_NAME = "thinkdiff-lvlm-random.safetensors"
PROMPT, LAYOUT = "red\nblue\ngreen", "in-context words"  # the encode node's default CoBSAT prompt, 2 pictures
CONTENDERS = ("generate", "fast", "static_compile", "fast_no_cuda_graphs")
# Tiny shapes: the real architecture at toy size (odd intermediate size on purpose), same code path as the 7B.
TINY_TEXT = qwen2vl_text(499, 64, 77, 2, 4, 2, 4096, rope_theta=10000.0, mrope_section=[4, 2, 2])
TINY_VISION = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=14)
# (time limit, time it needs at least to be worth starting) per step, in seconds, on an H200; tiny runs scale them.
STEP_LIMITS = {
    "env": (30, 1),
    "build": (180, 20),
    "load": (150, 15),
    "generate": (90, 15),
    "fast": (120, 20),
    "static_compile": (200, 45),
    "fast_no_cuda_graphs": (90, 15),
    "quant_8bit": (120, 50),
    "quant_4bit": (120, 40),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes, float32 (a CPU proves the script runs)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default $OUT, else bench/results)")
    parser.add_argument("--workdir", type=Path, default=None, help="where the model folders go (default: a temp dir)")
    parser.add_argument("--num-tokens", type=int, default=None, help="tokens to generate (128; 6 with --tiny)")
    parser.add_argument("--quant-tokens", type=int, default=32, help="tokens for the 8-/4-bit runs (slow kernels)")
    parser.add_argument("--image-size", type=int, default=448, help="side of each picture (448 -> 256 vision tokens)")
    parser.add_argument("--repeats", type=int, default=None, help="warm node calls timed (2; 1 with --tiny)")
    parser.add_argument("--layers", type=int, default=None, help="fewer text/vision layers (a path check, no timing)")
    parser.add_argument("--deadline", type=float, default=None, help="global limit in seconds (390; 240 with --tiny)")
    parser.add_argument(
        "--compile-backend",
        default="inductor",
        help="torch.compile backend of the fast engine and of the static-cache contender (aot_eager: cheap on a CPU)",
    )
    parser.add_argument("--skip", nargs="*", default=[], help=f"steps to leave out, of {sorted(STEP_LIMITS)}")
    parser.add_argument("--warm-caches", action="store_true", help="keep inductor's on-disk caches (default: cold)")
    args = parser.parse_args(argv)
    args.num_tokens = args.num_tokens or (6 if args.tiny else 128)
    args.repeats = args.repeats or (1 if args.tiny else 2)
    args.deadline = args.deadline or (240.0 if args.tiny else 390.0)
    args.out = args.out or Path(os.environ.get("OUT") or "bench/results")
    return args


# --- the run: guarded steps, a global deadline, partial results after every step ----------------------------------


class StepTimeout(Exception):
    pass


class Skipped(Exception):
    """A step that cannot run here (no CUDA, no bitsandbytes): recorded as skipped with the reason."""


class Run:
    """The record being built, where it is written, and the clock every step is held to."""

    def __init__(self, out: Path, deadline_s: float, scale: float = 1.0) -> None:
        self.out = out
        self.started = time.monotonic()
        self.deadline = self.started + deadline_s
        self.scale = scale
        self.record: dict = {"bench": "gpu_check", "steps": {}, "contenders": {}, "complete": False}
        self.lock = threading.Lock()
        self.cleanup: list[Path] = []  # folders to delete however the run ends
        out.mkdir(parents=True, exist_ok=True)

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def step(self, name: str, function, *args):
        """Run function(*args) under the step's limit; record ok / failed / timed out / skipped and write the JSON.

        Returns the function's result, or None when it did not complete."""
        limit, needs = (value * self.scale for value in STEP_LIMITS.get(name, (60, 1)))
        entry: dict = {}
        result = None
        if self.remaining() < needs:
            entry = {
                "status": "skipped",
                "reason": f"{self.remaining():.0f} s left of the deadline, needs ~{needs:.0f} s",
            }
        else:
            limit = min(limit, self.remaining())
            started = time.monotonic()
            previous = signal.signal(signal.SIGALRM, _raise_timeout)
            signal.setitimer(signal.ITIMER_REAL, limit)
            try:
                result = function(*args)
                entry["status"] = "ok"
            except StepTimeout:
                entry.update(status="timed out", reason=f"past its limit of {limit:.1f} s")
            except Skipped as skipped:
                entry.update(status="skipped", reason=str(skipped))
            except Exception as error:  # noqa: BLE001 - a failed step is a result; the next one still runs
                first = (str(error).strip().splitlines() or [""])[0][:400]
                entry.update(status="failed", reason=f"{type(error).__name__}: {first}")
                entry["traceback"] = traceback.format_exc(limit=-6)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, previous)
            entry["seconds"] = round(time.monotonic() - started, 2)
            if entry["status"] not in ("ok", "skipped"):
                free_memory()
        with self.lock:
            self.record["steps"][name] = entry
        print(f"[gpu_check] {name}: {entry['status']} {entry.get('seconds', '')} {entry.get('reason', '')}", flush=True)
        self.write()
        return result

    def write(self) -> None:
        """The JSON and the markdown as they stand (atomic: a reader never sees half a file)."""
        with self.lock:
            self.record["elapsed_s"] = round(time.monotonic() - self.started, 1)
            text = json.dumps(self.record, indent=1, default=str)
            markdown = render_markdown(self.record)
        for name, content in (("gpu_check.json", text), ("gpu_check.md", markdown)):
            temporary = self.out / f".{name}.tmp"
            temporary.write_text(content + "\n")
            temporary.replace(self.out / name)

    def watchdog(self, grace_s: float = 15.0) -> threading.Timer:
        """At the deadline plus a grace, write what there is and end the process: a hang in C code (a stuck
        compile, a kernel) cannot eat the device budget. The shell's timeout is the last resort behind it."""

        def expire():
            with contextlib.suppress(Exception):
                self.record["aborted"] = "global deadline reached; figures up to the step running then are kept"
                self.write()
            for folder in self.cleanup:  # a 16 GB model folder on the RAM disk must not outlive the run
                shutil.rmtree(folder, ignore_errors=True)
            print("[gpu_check] global deadline reached: exiting with what was measured", flush=True)
            os._exit(3)

        timer = threading.Timer(max(self.remaining(), 0) + grace_s, expire)
        timer.daemon = True
        timer.start()
        return timer


def _raise_timeout(signum, frame):
    raise StepTimeout()


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function, device: torch.device):
    synchronize(device)
    started = time.perf_counter()
    result = function()
    synchronize(device)
    return time.perf_counter() - started, result


def decode_rate(num_tokens: int, node_s: float, prefill_s: float) -> float | None:
    """Tokens after the first per second: (N - 1) / (N-token node time - 1-token node time); None when the
    difference is below timing noise (a tiny run)."""
    decode_s = node_s - prefill_s
    return round((num_tokens - 1) / decode_s, 1) if num_tokens > 1 and decode_s > 1e-3 else None


def gib(value: int) -> float:
    return round(value / 2**30, 3)


def memory(device: torch.device) -> dict:
    if device.type != "cuda":
        return {"allocated_gib": None, "reserved_gib": None}
    synchronize(device)
    return {
        "allocated_gib": gib(torch.cuda.memory_allocated(device)),
        "reserved_gib": gib(torch.cuda.memory_reserved(device)),
    }


# --- 1. environment -----------------------------------------------------------------------------------------------


def version_of(distribution: str) -> str | None:
    """The installed version, read from the package metadata (importing diffusers alone takes seconds)."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: torch.device) -> dict:
    info: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu"),
        "device_type": device.type,
        "cpu_count": os.cpu_count(),
        "versions": {
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "transformers": version_of("transformers"),
            "diffusers": version_of("diffusers"),
            "bitsandbytes": version_of("bitsandbytes"),
            "triton": version_of("triton"),
            "python": platform.python_version(),
        },
        "date": time.strftime("%Y-%m-%d"),
        "driver": None,
    }
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        info["memory_gib"] = gib(properties.total_memory)
        info["capability"] = f"{properties.major}.{properties.minor}"
        with contextlib.suppress(Exception):
            query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
            line = subprocess.run(query, capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
            info["nvidia_smi"] = line
            info["driver"] = line.split(",")[1].strip()
    return info


# --- 2. the random-weight model folders ---------------------------------------------------------------------------


def write_model_folders(root: Path, tiny: bool, layers: int | None, device: torch.device, dtype: torch.dtype) -> dict:
    """models/LLM/<VLM_NAME> (random weights of the shapes, stand-in tokenizer and processor) and
    models/thinkdiff/<ALIGNER_NAME>. The model is built where it will run (cuda: seconds), then written."""
    from transformers import AutoConfig, AutoProcessor, GenerationConfig, Qwen2VLConfig, Qwen2VLForConditionalGeneration

    started = time.perf_counter()
    standin_dir = standin.build_qwen2vl(root / "standin-qwen2-vl")  # tokenizer, processor, special-token ids
    ids = AutoConfig.from_pretrained(standin_dir)
    text, vision = (TINY_TEXT, TINY_VISION) if tiny else (QWEN2_VL_7B_TEXT, QWEN2_VL_7B_VISION)
    fewer = {"num_hidden_layers": layers} if layers else {}
    config = Qwen2VLConfig(
        text_config={
            **text,
            **fewer,
            "bos_token_id": ids.text_config.bos_token_id,
            "eos_token_id": ids.text_config.eos_token_id,
            "pad_token_id": ids.text_config.pad_token_id,
        },
        vision_config={**vision, **({"depth": layers} if layers else {})},
        **{name: getattr(ids, name) for name in ("image_token_id", "video_token_id")},
        **{name: getattr(ids, name) for name in ("vision_start_token_id", "vision_end_token_id")},
    )
    torch.manual_seed(0)
    with torch.device(device):  # initialised on the device it is built for: never a 16 GB init on the CPU first
        model = Qwen2VLForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.generation_config = GenerationConfig.from_pretrained(standin_dir)
    synchronize(device)
    built_s = time.perf_counter() - started

    folder = root / "LLM" / VLM_NAME
    processor = AutoProcessor.from_pretrained(standin_dir)
    if not tiny:  # Qwen2-VL's own pixel limits (the stand-in's are toy-sized)
        image_processor = processor.image_processor
        image_processor.min_pixels, image_processor.max_pixels = 56 * 56, 28 * 28 * 1280
        if hasattr(image_processor, "size"):
            image_processor.size = {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280}
    started = time.perf_counter()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    written_s = time.perf_counter() - started
    size = sum(file.stat().st_size for file in folder.iterdir())

    torch.manual_seed(1)
    width = config.text_config.hidden_size
    aligner = ThinkDiffAligner(AlignerSpec("lvlm", width, 4096, source_model=VLM_NAME, num_tokens=128))
    save_aligner(aligner, root / "thinkdiff" / ALIGNER_NAME)
    parameters = sum(p.numel() for p in model.parameters())
    del model
    free_memory()
    return {
        "model": "tiny Qwen2-VL shapes"
        if tiny
        else f"Qwen2-VL-7B-Instruct shapes{f', {layers} layers' if layers else ''}",
        "parameters": parameters,
        "dtype": str(dtype).replace("torch.", ""),
        "text_config": {**text, **fewer},
        "vision_config": {**vision, **({"depth": layers} if layers else {})},
        "aligner": f"{width} -> 4096",
        "build_on_device_s": round(built_s, 2),
        "write_s": round(written_s, 2),
        "folder_gb": round(size / 1e9, 3),
        "write_gb_per_s": round(size / 1e9 / max(written_s, 1e-9), 2),
        "folder_on": str(root),
    }


def scratch_folder(args) -> str | None:
    """Where the model folder is written: RAM-backed /dev/shm when it has room (about 1.3x the 16.6 GB folder),
    since the local disk of a device machine may write far slower than the ~1 GB/s the budget assumes; the loader
    reads the folder the same way from either. Else the default temp folder."""
    needed = 2e9 if args.tiny else 22e9 * ((args.layers or 28) / 28 + 0.1)
    shm = Path("/dev/shm")
    with contextlib.suppress(OSError):
        if shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > needed:
            return str(shm)
    return None


# --- 3. the node graph --------------------------------------------------------------------------------------------


class Graph:
    """The nodes of a ThinkDiff workflow, standalone: VLM loader -> encode -> (aligner loader) -> conditioning."""

    def __init__(self, root: Path, device: torch.device, dtype: torch.dtype, image_size: int) -> None:
        comfy_adapter.set_models_root(root)
        self.device, self.dtype = device, dtype
        pictures = [
            standin.draw_shape_image("red", size=image_size),
            standin.draw_shape_image("blue", "circle", size=image_size),
        ]
        self.images = {f"image_{k}": image_tensor_from_pil(picture) for k, picture in enumerate(pictures, start=1)}
        # Exactly what the encode node builds from its inputs, for the teacher-forced runs outside the node.
        pils = [pil for key in sorted(self.images) for pil in pil_images_from_tensor(self.images[key])]
        self.messages = chat_messages(layout_content(LAYOUT, PROMPT, pils))
        # A base of ComfyUI's FLUX CONDITIONING structure, as CLIPTextEncodeFlux gives it (T5 256 tokens, CLIP-L pooled).
        generator = torch.Generator().manual_seed(2)
        self.base = [
            [
                torch.randn(1, 256, 4096, generator=generator),
                {"pooled_output": torch.randn(1, 768, generator=generator), "guidance": 3.5},
            ]
        ]
        self.vlm = self.aligner = None

    def load(self, engine: str = "generate", quantization: str = "none"):
        dtype = str(self.dtype).replace("torch.", "")
        (vlm,) = ThinkDiffVLMLoader().load(VLM_NAME, dtype, self.device.type, "sdpa", False, engine, quantization)
        return vlm

    def load_aligner(self):
        (self.aligner,) = ThinkDiffAlignerLoader().load(ALIGNER_NAME)
        return self.aligner

    def encode(self, vlm, num_tokens: int, keep_model_loaded: bool = True):
        output = ThinkDiffVLMEncode().encode(
            vlm, PROMPT, LAYOUT, num_tokens, 42, 0.6, 0.9, True, keep_model_loaded, **self.images
        )
        return output["result"][0]

    def condition(self, features):
        (conditioning,) = ThinkDiffConditioning().apply(self.aligner, features, "replace", 1.0, self.base, 0)
        return conditioning


def with_engine(handle, engine: str, fast_options: FastDecodeOptions | None = None):
    """The loader's output as it would be with another engine widget value: the same weights, a new bundle (its own
    fast decoder), under the same management."""
    bundle = dataclasses.replace(handle.model, engine=engine, fast_options=fast_options or handle.model.fast_options)
    return dataclasses.replace(handle, model=bundle)


class _ForcingProcessor:
    """A logits processor for transformers' generate that teacher-forces `forced`'s tokens (ForcedChoice records
    generate's own greedy pick and its margin at each step). Runs after generate's own processors, as TokenChooser."""

    def __init__(self, forced: ForcedChoice, prompt_length: int) -> None:
        self.forced, self.prompt_length = forced, prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        chosen = self.forced(scores, input_ids.shape[1] - self.prompt_length)
        return torch.full_like(scores, -math.inf).scatter_(1, chosen[:, None].to(scores.device), 0.0)


def forced_generate(vlm, messages, settings: GenerationSettings, tokens: torch.Tensor):
    """transformers' generate (with whatever cache and compile its generation config asks for) fed `tokens`."""
    from transformers import LogitsProcessorList

    inputs = model_inputs(vlm, [messages], add_vision_id=True)
    forced = ForcedChoice(tokens)
    processors = LogitsProcessorList([_ForcingProcessor(forced, inputs["input_ids"].shape[1])])
    capture = FinalNormCapture(vlm.model)
    with torch.inference_mode(), capture:
        vlm.model.generate(**inputs, **generate_kwargs(vlm, settings, None), logits_processor=processors)
    return forced, torch.cat(capture.states, dim=1)[:, : settings.num_tokens]


_RECORD = FinalNormCapture._record


def _record_outside_compile(self, module, args, output):
    # Out of the compiled graph: traced, the hook guards on len(states) and recompiles at every token; and a copy,
    # since under CUDA graphs the norm's output lives in graph memory that the next replay overwrites.
    return _RECORD(self, module, args, output.clone())


@contextlib.contextmanager
def transformers_static_cache(model, backend: str, device: torch.device):
    """generate with cache_implementation="static" and its automatic compile (transformers' default CompileConfig on
    CUDA with inductor; another backend, or a CPU, through CompileConfig). The pack's final-norm capture hook runs
    outside the compiled graph (see _record_outside_compile): the change the core would need on this path."""
    from transformers import CompileConfig

    config = model.generation_config
    saved = (config.cache_implementation, getattr(config, "compile_config", None))
    config.cache_implementation = "static"
    if backend != "inductor" or device.type != "cuda":
        compile_config = CompileConfig(backend=backend, mode="reduce-overhead" if backend == "inductor" else None)
        compile_config._compile_all_devices = device.type != "cuda"  # transformers compiles on CUDA only otherwise
        config.compile_config = compile_config
    FinalNormCapture._record = torch.compiler.disable(_record_outside_compile)
    try:
        yield
    finally:
        FinalNormCapture._record = _RECORD
        config.cache_implementation, config.compile_config = saved


# --- 4. contenders ------------------------------------------------------------------------------------------------


def compare(features, reference, conditioning=None, reference_conditioning=None) -> dict:
    """Free-running tokens against the reference: identical?, first divergence, and features / conditioning over
    the common prefix (state k belongs to the same tokens while tokens 0..k-1 agree)."""
    ours, theirs = features.generated_ids.cpu(), reference.generated_ids.cpu()
    mismatch = (ours != theirs).any(dim=0).nonzero()
    first = int(mismatch[0]) if len(mismatch) else None
    common = ours.shape[1] if first is None else first + 1
    result = {"tokens_identical": first is None, "first_divergence": first, "common_prefix_vectors": common}
    result["features_prefix"] = errors(features.hidden_states[:, :common], reference.hidden_states[:, :common])
    if conditioning is not None:
        result["conditioning_prefix"] = errors(conditioning[0][0][:, :common], reference_conditioning[0][0][:, :common])
    return result


def errors(ours: torch.Tensor, reference: torch.Tensor) -> dict:
    ours, reference = ours.detach().float().cpu(), reference.detach().float().cpu()
    difference = (ours - reference).abs()
    scale = reference.abs().max().item() or 1.0
    return {
        "max_abs": difference.max().item() if difference.numel() else 0.0,
        "max_rel_to_reference_max": (difference.max().item() / scale) if difference.numel() else 0.0,
        "within_bf16_tolerance": bool((difference <= BF16_RTOL * (1 + reference.abs())).all()),
    }


def teacher_forced_summary(forced: ForcedChoice, states: torch.Tensor, reference, aligner) -> dict:
    disagreements, margin = forced.disagreements(), forced.max_margin()
    features = errors(states, reference.hidden_states)
    return {
        "greedy_disagreements": disagreements,
        "max_relative_margin": margin,
        "greedy_agrees_up_to_near_ties": disagreements == 0 or margin <= NEAR_TIE,
        "features": features,
        "conditioning": errors(_align(aligner, states), _align(aligner, reference.hidden_states)),
    }


def _align(aligner, states: torch.Tensor) -> torch.Tensor:
    parameter = next(aligner.model.parameters())
    with torch.inference_mode():
        return aligner.model(states.to(parameter.device, parameter.dtype)).float().cpu()


class Check:
    """Everything the steps share."""

    def __init__(self, args, run: Run) -> None:
        self.args, self.run = args, run
        self.device = torch.device(args.device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.dtype = torch.float32 if args.tiny else torch.bfloat16
        self.root = args.workdir or Path(tempfile.mkdtemp(prefix="thinkdiff-gpu-check-", dir=scratch_folder(args)))
        self.graph = Graph(self.root, self.device, self.dtype, 56 if args.tiny else args.image_size)
        self.handle = None
        self.reference = self.reference_conditioning = None
        self.settings = GenerationSettings(num_tokens=args.num_tokens, greedy=True)

    # steps --------------------------------------------------------------------------------------------------------

    def env(self) -> None:
        self.run.record.update(environment(self.device))
        self.run.record["mode"] = "tiny (CPU proof, not a speed figure)" if self.args.tiny else "real shapes"

    def build(self) -> None:
        self.run.record["shapes"] = write_model_folders(
            self.root, self.args.tiny, self.args.layers, self.device, self.dtype
        )

    def load(self) -> None:
        seconds, self.handle = timed(lambda: self.graph.load("generate"), self.device)
        aligner_s, aligner = timed(self.graph.load_aligner, self.device)
        comfy_adapter.load_to_device(aligner)  # where the conditioning node puts it once; not counted to a contender
        self.run.record["load"] = {"vlm_loader_node_s": round(seconds, 2), "aligner_loader_node_s": round(aligner_s, 2)}

    def contender(self, name: str) -> dict:
        if self.handle is None:
            raise RuntimeError("no VLM: the load step did not complete")
        if name != "generate" and self.reference is None:
            raise RuntimeError("no reference: the generate step did not complete")
        backend = self.args.compile_backend
        compile_on = None if self.device.type == "cuda" else True  # on a CPU compile too (the tiny proof)
        options = {
            "generate": None,
            "fast": FastDecodeOptions(compile=compile_on, compile_backend=backend),
            "fast_no_cuda_graphs": FastDecodeOptions(compile=compile_on, cuda_graphs=False, compile_backend=backend),
            "static_compile": None,
        }[name]
        handle = with_engine(self.handle, "fast" if name.startswith("fast") else "generate", options)
        vlm = handle.model
        setup = (
            transformers_static_cache(vlm.model, backend, self.device)
            if name == "static_compile"
            else contextlib.nullcontext()
        )
        record: dict = {"engine_widget": vlm.engine}
        self.run.record["contenders"][name] = record  # partial figures survive a timeout
        free_memory()
        before = memory(self.device)
        record["memory_before"] = before
        try:
            record["to_device_s"] = round(timed(lambda: comfy_adapter.load_to_device(handle), self.device)[0], 3)
            n = self.args.num_tokens
            with setup:
                first_s, features = timed(lambda: self.graph.encode(handle, n), self.device)
                record["first_call_s"] = round(first_s, 3)
                times, graphs = [], counters["stats"]["unique_graphs"]
                for _ in range(self.args.repeats):
                    if self.device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(self.device)
                    seconds, features = timed(lambda: self.graph.encode(handle, n), self.device)
                    times.append(seconds)
                node_s = statistics.median(times)
                # dynamo graphs compiled during the warm calls: 0 unless something recompiles call after call
                record["graphs_compiled_while_warm"] = counters["stats"]["unique_graphs"] - graphs
                if self.device.type == "cuda":
                    record["peak_memory_gib"] = gib(torch.cuda.max_memory_allocated(self.device))
                conditioning_s, conditioning = timed(lambda: self.graph.condition(features), self.device)
                prefill_s = statistics.median(
                    timed(lambda: self.graph.encode(handle, 1), self.device)[0] for _ in range(self.args.repeats)
                )
                record.update(
                    prompt_tokens=int(features.prompt_ids.shape[1]),
                    node_s=round(node_s, 4),
                    node_times_s=[round(t, 4) for t in times],
                    compile_and_capture_s=round(max(first_s - node_s, 0.0), 3),
                    conditioning_node_s=round(conditioning_s, 4),
                    prefill_ms=round(prefill_s * 1000, 2),
                    decode_tokens_per_s=decode_rate(n, node_s, prefill_s),
                    end_to_end_tokens_per_s=round(n / node_s, 1),
                    conditioning=_describe(conditioning),
                )
                if name.startswith("fast"):
                    decoder = vlm.fast_decoder()
                    record["fast_engine"] = {"compiled": decoder.compiled, "captured_graphs": decoder.captured_graphs}
                if name == "generate":
                    self.reference, self.reference_conditioning = features, conditioning
                else:
                    record.update(compare(features, self.reference, conditioning, self.reference_conditioning))
                    if name == "static_compile":
                        forced, states = forced_generate(
                            vlm, self.graph.messages, self.settings, self.reference.generated_ids
                        )
                    else:
                        forced, _, states = teacher_forced(
                            vlm, [self.graph.messages], self.settings, self.reference.generated_ids, add_vision_id=True
                        )
                    record["teacher_forced"] = teacher_forced_summary(
                        forced, states, self.reference, self.graph.aligner
                    )
        finally:  # also after a failure or a timeout, so the next contender starts from the same place
            comfy_adapter.release(handle)  # what the encode node does with keep_model_loaded off
            after = memory(self.device)
            record["after_release"] = after
            if after["allocated_gib"] is not None:
                record["left_after_release_gib"] = round(after["allocated_gib"] - before["allocated_gib"], 3)
        return record

    def quantized(self, quantization: str) -> dict | None:
        name = f"quant_{quantization[0]}bit"
        reason = None
        if self.device.type != "cuda":
            reason = f"{quantization} loading needs a CUDA GPU (bitsandbytes)"
        elif importlib.util.find_spec("bitsandbytes") is None:
            reason = (
                f"bitsandbytes is not installed here, so {quantization} was not measured (pip install bitsandbytes)"
            )
        if reason:
            self.run.record["contenders"][name] = {"skipped": reason}
            raise Skipped(reason)
        record: dict = {}
        self.run.record["contenders"][name] = record
        free_memory()
        before = memory(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        load_s, handle = timed(lambda: self.graph.load("auto", quantization), self.device)
        record.update(
            load_s=round(load_s, 2), weights_gib=memory(self.device)["allocated_gib"] - before["allocated_gib"]
        )
        n = min(self.args.quant_tokens, self.args.num_tokens)
        first_s, features = timed(lambda: self.graph.encode(handle, n), self.device)
        seconds, features = timed(lambda: self.graph.encode(handle, n), self.device)
        prefill_s, _ = timed(lambda: self.graph.encode(handle, 1), self.device)
        record.update(
            num_tokens=n,
            first_call_s=round(first_s, 3),
            node_s=round(seconds, 4),
            prefill_ms=round(prefill_s * 1000, 2),
            decode_tokens_per_s=decode_rate(n, seconds, prefill_s),
            peak_memory_gib=gib(torch.cuda.max_memory_allocated(self.device)),
        )
        if self.reference is not None:
            prefix = dataclasses.replace(
                self.reference,
                generated_ids=self.reference.generated_ids[:, :n],
                hidden_states=self.reference.hidden_states[:, :n],
            )
            record.update(compare(features, prefix))
        handle = features = None  # the quantized weights go with the last reference
        free_memory()
        record["left_after_delete_gib"] = round(memory(self.device)["allocated_gib"] - before["allocated_gib"], 3)
        return record


def _describe(conditioning) -> dict:
    cond, options = conditioning[0]
    return {
        "entries": len(conditioning),
        "tokens": list(cond.shape),
        "pooled": list(options["pooled_output"].shape),
        "guidance": options.get("guidance"),
        "finite": bool(torch.isfinite(cond).all()),
    }


# --- 6. the decision ----------------------------------------------------------------------------------------------


def tokens_match(record: dict) -> bool:
    """Identical greedy tokens, or (teacher forced) every disagreement a bf16 near-tie, with features within bf16
    tolerance of the reference's."""
    forced = record.get("teacher_forced") or {}
    agree = record.get("tokens_identical") or forced.get("greedy_agrees_up_to_near_ties", False)
    return bool(agree and forced.get("features", {}).get("within_bf16_tolerance", False))


def decide(contenders: dict, tiny: bool = False) -> dict:
    """The issue's rule: the pack's engine stays the default only where it beats transformers' static cache by at
    least 1.5x (warm encode node, end to end) in the same run with matching tokens; otherwise transformers' path."""
    fast, static = contenders.get("fast") or {}, contenders.get("static_compile") or {}
    verdict: dict = {
        "rule": f"keep the pack's engine as default only if its warm encode-node time beats transformers' static cache "
        f"+ torch.compile by >= {SPEEDUP_BAR}x in the same run, with matching tokens",
        "binding": not tiny,
    }
    if "node_s" not in static:
        verdict.update(keep_fast_engine=None, text="inconclusive: the static-cache contender did not complete; rerun")
        return verdict
    if "node_s" not in fast or "teacher_forced" not in fast:
        verdict.update(
            keep_fast_engine=False,
            text="switch the default to transformers' path: the pack's engine did not complete in this run",
        )
        return verdict
    speedup = static["node_s"] / fast["node_s"]
    rates = fast.get("decode_tokens_per_s"), static.get("decode_tokens_per_s")
    decode_speedup = round(rates[0] / rates[1], 3) if all(rates) else None
    matching = tokens_match(fast)
    keep = matching and speedup >= SPEEDUP_BAR
    generate = contenders.get("generate") or {}
    faster_transformers = "static_compile"
    if generate.get("node_s") and generate["node_s"] < static["node_s"]:
        faster_transformers = "generate"
    verdict.update(
        speedup_node=round(speedup, 3),
        speedup_decode=decode_speedup,
        fast_tokens_match=matching,
        static_tokens_match=tokens_match(static),
        keep_fast_engine=keep,
        faster_transformers_path=faster_transformers,
    )
    if keep:
        verdict["text"] = (
            f"keep the pack's engine as default: {speedup:.2f}x transformers' static cache (>= {SPEEDUP_BAR}x) with "
            f"matching tokens"
        )
    else:
        why = f"{speedup:.2f}x < {SPEEDUP_BAR}x" if speedup < SPEEDUP_BAR else "its tokens do not match the reference"
        path = "static cache + torch.compile" if faster_transformers == "static_compile" else "generate, dynamic cache"
        verdict["text"] = (
            f"switch the default to transformers' path ({path}, the faster here) and retire the engine: {why}"
        )
    if tiny:
        verdict["text"] = "not binding (a CPU or tiny-shape run): " + verdict["text"]
    return verdict


# --- the markdown snippet -----------------------------------------------------------------------------------------


def render_markdown(record: dict) -> str:
    tiny = "tiny" in str(record.get("mode", "")) or record.get("device_type") != "cuda"
    versions = record.get("versions", {})
    shapes = record.get("shapes", {})
    prompt = (record.get("contenders", {}).get("generate") or {}).get("prompt_tokens", "?")
    label = " (CPU / tiny shapes: proves the script runs end to end; not a speed figure)" if tiny else ""
    lines = [
        f"### GPU check: {record.get('device', '?')}, driver {record.get('driver') or 'n/a'}, {record.get('date', '?')}{label}",
        "",
        f"`bash bench/run_gpu.sh` -> `bench/gpu_check.py`: torch {versions.get('torch')} (CUDA {versions.get('cuda')}), "
        f"transformers {versions.get('transformers')}, diffusers {versions.get('diffusers')}, bitsandbytes "
        f"{versions.get('bitsandbytes') or 'not installed'}; {shapes.get('model', '?')}, random {shapes.get('dtype', '?')} "
        f"weights ({_count(shapes.get('parameters', 0))} parameters), 2 pictures ({prompt} prompt tokens), "
        f"{record.get('settings', {}).get('num_tokens', '?')} tokens, greedy. Folder written at "
        f"{shapes.get('write_gb_per_s', '?')} GB/s to {shapes.get('folder_on', '?')} ({shapes.get('folder_gb', '?')} GB in "
        f"{shapes.get('write_s', '?')} s); "
        f"VLM loader node {record.get('load', {}).get('vlm_loader_node_s', '?')} s.",
        "",
        "| contender | first call s | warm node s | prefill ms | decode tok/s | peak GiB | left after release GiB "
        "| tokens vs generate | teacher-forced greedy | features max abs (rel) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, c in record.get("contenders", {}).items():
        if "skipped" in c:
            lines.append(f"| {name} | skipped: {c['skipped']} | | | | | | | | |")
            continue
        status = record.get("steps", {}).get(name, {}).get("status", "running")
        if name == "generate":
            tokens, forced_text, feature_text = "reference", "reference", "reference"
        else:
            divergence = c.get("first_divergence")
            tokens = "identical" if c.get("tokens_identical") else f"differ from token {divergence}"
            forced = c.get("teacher_forced", {})
            forced_text = (
                f"{forced.get('greedy_disagreements')} disagreements, max margin {forced.get('max_relative_margin', 0):.2g}"
                if forced
                else ""
            )
            f = forced.get("features") or c.get("features_prefix") or {}
            feature_text = f"{f.get('max_abs', 0):.3g} ({f.get('max_rel_to_reference_max', 0):.2g})" if f else ""
        left = c.get("left_after_release_gib", c.get("left_after_delete_gib"))
        cells = [
            c.get("first_call_s"),
            c.get("node_s"),
            c.get("prefill_ms"),
            c.get("decode_tokens_per_s"),
            c.get("peak_memory_gib"),
            left,
        ]
        name_cell = name if status == "ok" else f"{name} ({status})"
        lines.append(
            f"| {name_cell} | "
            + " | ".join("" if v is None else str(v) for v in cells)
            + f" | {tokens} | {forced_text} | {feature_text} |"
        )
    warm = [
        f"{k} {c['graphs_compiled_while_warm']}"
        for k, c in record.get("contenders", {}).items()
        if "graphs_compiled_while_warm" in c
    ]
    if warm:
        lines += [
            "",
            "Graphs compiled during the warm calls (0: nothing recompiles call after call): " + ", ".join(warm),
        ]
    verdict = record.get("verdict")
    lines += ["", f"**Verdict:** {verdict['text']}" if verdict else "**Verdict:** not reached"]
    failed = {k: v for k, v in record.get("steps", {}).items() if v.get("status") not in ("ok", None)}
    if failed:
        lines += [
            "",
            "Steps not run or not completed: "
            + "; ".join(f"{k}: {v['status']} ({v.get('reason', '')})" for k, v in failed.items()),
        ]
    if record.get("aborted"):
        lines += ["", f"**Aborted:** {record['aborted']}"]
    return "\n".join(lines)


def _count(parameters: int) -> str:
    return f"{parameters / 1e9:.2f} B" if parameters >= 1e8 else f"{parameters:,}"


# --- main ---------------------------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    cold_compile_caches(args)
    run = Run(args.out, args.deadline, scale=2.0 if args.tiny else 1.0)
    watchdog = run.watchdog()
    # `timeout` sends SIGTERM: end through the finally below (figures written, model folder deleted)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    check = Check(args, run)
    if args.workdir is None:
        run.cleanup.append(check.root)
    run.record["arguments"] = {k: str(v) for k, v in vars(args).items()}
    run.record["settings"] = {"num_tokens": args.num_tokens, "repeats": args.repeats, "greedy": True, "layout": LAYOUT}
    steps = [("env", check.env), ("build", check.build), ("load", check.load)]
    steps += [(name, lambda name=name: check.contender(name)) for name in CONTENDERS]
    steps += [("quant_8bit", lambda: check.quantized("8-bit")), ("quant_4bit", lambda: check.quantized("4-bit"))]
    try:
        for name, function in steps:
            if name in args.skip:
                run.record["steps"][name] = {"status": "skipped", "reason": "--skip"}
                continue
            run.step(name, function)
        run.record["verdict"] = decide(run.record["contenders"], tiny=args.tiny or check.device.type != "cuda")
        run.record["complete"] = True
    finally:
        watchdog.cancel()
        comfy_adapter.set_models_root(None)
        run.write()
        for folder in run.cleanup:
            shutil.rmtree(folder, ignore_errors=True)
    print(f"[gpu_check] verdict: {run.record['verdict']['text']}", flush=True)
    print(json.dumps(run.record, default=str))
    return run.record


if __name__ == "__main__":
    main()
