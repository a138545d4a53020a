"""The fast decode engine against transformers' generate, on the tiny real Qwen2-VL (CPU).

Greedy tokens must be identical and features equal to float tolerance; EOS handling, sampling, Cancel, compiled
layers (traced by dynamo with the aot_eager backend: the same graphs inductor compiles on a GPU) and the fallback for
models the engine does not reproduce. CUDA graph capture itself needs a GPU: bench/bench_vlm_encode.py covers it.
"""

import pytest
import torch
from torch._dynamo.utils import counters

from bench_common import teacher_forced
from thinkdiff_core import GenerationSettings, encode_with_vlm
from thinkdiff_core.fast_decode import FastDecodeOptions, FastDecoder, unsupported_reason
from thinkdiff_core.prompts import chat_messages, cobsat_content, interleaved_content, text_part
from thinkdiff_core.vlm_loader import VlmBundle, load_vlm


@pytest.fixture
def conversations(shape_images):
    return [
        chat_messages(cobsat_content(["red", "blue", "green"], shape_images)),
        chat_messages(
            interleaved_content(
                "a longer prompt: a picture <image> and then some more words after it", shape_images[:1]
            )
        ),
        chat_messages([text_part("no picture at all")]),
    ]


def valid_mask(features):
    positions = torch.arange(features.hidden_states.shape[1])
    return positions[None, :] < features.lengths[:, None]


def assert_same_features(a, b, atol=1e-5):
    assert torch.equal(a.generated_ids, b.generated_ids)
    assert torch.equal(a.lengths, b.lengths)
    assert a.text == b.text
    mask = valid_mask(a)
    assert (a.hidden_states - b.hidden_states).abs()[mask].max() < atol


@pytest.mark.parametrize("rows", [1, 3])
def test_greedy_tokens_and_features_match_generate(tiny_vlm, conversations, rows):
    settings = GenerationSettings(num_tokens=24, greedy=True)
    reference = encode_with_vlm(tiny_vlm, conversations[:rows], settings, engine="generate")
    fast = encode_with_vlm(tiny_vlm, conversations[:rows], settings, engine="fast")
    assert fast.hidden_states.shape == reference.hidden_states.shape == (rows, 24, tiny_vlm.hidden_size)
    assert_same_features(reference, fast)


def test_stop_at_eos_matches_generate(tiny_qwen2vl_dir, conversations):
    vlm = load_vlm(tiny_qwen2vl_dir, dtype=torch.float32, device="cpu")  # own copy: its EOS is changed below
    settings = GenerationSettings(num_tokens=30, greedy=True, stop_at_eos=True)
    free_run = encode_with_vlm(vlm, conversations, settings, engine="generate")
    # Make a token that row 0 first produces at step >= 1 the end-of-turn token, so rows end at different points
    # (the first new token, not a fixed step: a tiny random model repeats tokens).
    row = free_run.generated_ids[0].tolist()
    step = next((k for k in range(1, len(row)) if row[k] not in row[:k]), None)
    assert step is not None, f"row 0 repeats its first token for all {len(row)} steps: {row}"
    vlm.model.generation_config.eos_token_id = row[step]
    reference = encode_with_vlm(vlm, conversations, settings, engine="generate")
    fast = encode_with_vlm(vlm, conversations, settings, engine="fast")
    assert reference.lengths[0] == step + 1
    assert len(set(reference.lengths.tolist())) > 1, f"all rows ended together: {reference.lengths.tolist()}"
    assert_same_features(reference, fast)


def test_sampling_is_seeded_private_and_top_p_is_applied(tiny_vlm, conversations):
    settings = GenerationSettings(num_tokens=16, seed=7)
    state = torch.random.get_rng_state()
    first = encode_with_vlm(tiny_vlm, conversations, settings, engine="fast")
    assert torch.equal(torch.random.get_rng_state(), state)
    again = encode_with_vlm(tiny_vlm, conversations, settings, engine="fast")
    other = encode_with_vlm(tiny_vlm, conversations, GenerationSettings(num_tokens=16, seed=8), engine="fast")
    assert torch.equal(first.generated_ids, again.generated_ids)
    assert not torch.equal(first.generated_ids, other.generated_ids)
    # A vanishing top-p keeps only the most likely token: sampling becomes greedy decoding.
    narrow = encode_with_vlm(tiny_vlm, conversations, GenerationSettings(num_tokens=16, top_p=1e-6), engine="fast")
    greedy = encode_with_vlm(tiny_vlm, conversations, GenerationSettings(num_tokens=16, greedy=True), engine="fast")
    assert torch.equal(narrow.generated_ids, greedy.generated_ids)


def test_vision_tokens_never_generated(tiny_vlm, conversations):
    sampled = encode_with_vlm(
        tiny_vlm, conversations, GenerationSettings(num_tokens=40, temperature=5.0, top_p=1.0), engine="fast"
    )
    config = tiny_vlm.model.config
    vision = torch.tensor(
        [config.image_token_id, config.video_token_id, config.vision_start_token_id, config.vision_end_token_id]
    )
    assert not torch.isin(sampled.generated_ids, vision).any()


def test_progress_ticks_per_token_and_cancel_leaves_the_engine_usable(tiny_vlm, conversations):
    ticks = []

    def cancel_at_five(count):
        ticks.append(count)
        if count == 5:
            raise InterruptedError("cancelled")

    settings = GenerationSettings(num_tokens=12, greedy=True)
    with pytest.raises(InterruptedError):
        encode_with_vlm(tiny_vlm, conversations[:1], settings, on_token=cancel_at_five, engine="fast")
    assert ticks == [1, 2, 3, 4, 5]
    after = encode_with_vlm(tiny_vlm, conversations[:1], settings, engine="fast")
    assert_same_features(encode_with_vlm(tiny_vlm, conversations[:1], settings, engine="generate"), after)


def test_compiled_layers_compile_once_for_all_layers_and_prompt_lengths(tiny_vlm, conversations):
    vlm = VlmBundle(
        model=tiny_vlm.model,
        processor=tiny_vlm.processor,
        source_model=tiny_vlm.source_model,
        fast_options=FastDecodeOptions(compile=True, compile_backend="aot_eager", cache_bucket=64),
    )
    settings = GenerationSettings(num_tokens=20, greedy=True)
    torch._dynamo.reset()
    counters.clear()
    fast = encode_with_vlm(vlm, conversations[:1], settings, engine="fast")
    assert counters["stats"]["unique_graphs"] == 2  # the two halves of a layer, shared by every layer
    assert_same_features(encode_with_vlm(vlm, conversations[:1], settings, engine="generate"), fast)
    # Another prompt length (another cache bucket, too) reuses the compiled code.
    longer = encode_with_vlm(vlm, conversations[1:2], settings, engine="fast")
    assert counters["stats"]["unique_graphs"] == 2
    assert_same_features(encode_with_vlm(vlm, conversations[1:2], settings, engine="generate"), longer)


def test_engine_reuses_and_releases_its_buffers(tiny_vlm, conversations):
    vlm = VlmBundle(
        model=tiny_vlm.model,
        processor=tiny_vlm.processor,
        source_model="tiny",
        fast_options=FastDecodeOptions(cache_bucket=32, max_graphs=2),
    )
    settings = GenerationSettings(num_tokens=8, greedy=True)
    encode_with_vlm(vlm, conversations[:1], settings, engine="fast")
    decoder = vlm.fast_decoder()
    encode_with_vlm(vlm, conversations[:1], settings, engine="fast")
    assert vlm.fast_decoder() is decoder and len(decoder._states) == 1  # same shape: same buffers
    encode_with_vlm(vlm, conversations, settings, engine="fast")
    assert [key[1] for key in decoder._states][-1] == 4  # 3 rows run padded to a power of two
    encode_with_vlm(vlm, conversations[2:], settings, engine="fast")
    assert len(decoder._states) == 2  # at most max_graphs kept
    vlm.release_device_buffers()
    assert not decoder._states


def test_models_the_engine_does_not_reproduce_fall_back(tiny_qwen2vl_dir, conversations):
    vlm = load_vlm(tiny_qwen2vl_dir, dtype=torch.float32, device="cpu")
    assert unsupported_reason(vlm.model) is None

    class QuantizedLinear(torch.nn.Linear):
        pass

    layer = vlm.model.model.language_model.layers[0].mlp
    layer.up_proj.__class__ = QuantizedLinear
    assert "quantized" in unsupported_reason(vlm.model)
    with pytest.raises(ValueError, match="quantized.*generate"):
        encode_with_vlm(vlm, conversations[:1], GenerationSettings(num_tokens=4), engine="fast")
    with pytest.raises(ValueError, match="does not support"):
        FastDecoder(vlm.model)
    features = encode_with_vlm(vlm, conversations[:1], GenerationSettings(num_tokens=4), engine="auto")  # generate
    assert features.hidden_states.shape[1] == 4
    with pytest.raises(ValueError, match="engine must be one of"):
        encode_with_vlm(vlm, conversations[:1], GenerationSettings(num_tokens=4), engine="vllm")


def test_weights_fingerprint_follows_the_storage(tiny_qwen2vl_dir):
    """A captured CUDA graph holds weight addresses; the engine re-captures when the fingerprint changes (e.g. after
    ComfyUI evicted and reloaded the model). Here a weight gets new storage, as a device round trip gives it."""
    vlm = load_vlm(tiny_qwen2vl_dir, dtype=torch.float32, device="cpu")
    decoder = FastDecoder(vlm.model)
    before = decoder.parts.fingerprint()
    assert decoder.parts.fingerprint() == before
    down = vlm.model.model.language_model.layers[-1].mlp.down_proj
    down.weight.data = down.weight.data.clone()
    assert decoder.parts.fingerprint() != before


def test_teacher_forcing_compares_engines_on_the_same_tokens(tiny_vlm, conversations):
    settings = GenerationSettings(num_tokens=12, greedy=True)
    reference = encode_with_vlm(tiny_vlm, conversations, settings, engine="generate")
    agree, ids, states = teacher_forced(tiny_vlm, conversations, settings, reference.generated_ids)
    assert agree.disagreements() == 0 and agree.max_margin() == 0.0
    assert torch.equal(ids, reference.generated_ids)
    mask = valid_mask(reference)
    assert (states - reference.hidden_states).abs()[mask].max() < 1e-5
    # Forcing other tokens: the engine follows them, and its own greedy picks show where and by how much they differ.
    other = torch.roll(reference.generated_ids, shifts=1, dims=1)
    differ, followed, _ = teacher_forced(tiny_vlm, conversations, settings, other)
    assert torch.equal(followed, other)
    assert differ.disagreements() > 0 and differ.max_margin() > 0


def test_a_failing_compile_falls_back_to_the_uncompiled_step(tiny_vlm, conversations, caplog):
    vlm = VlmBundle(
        model=tiny_vlm.model,
        processor=tiny_vlm.processor,
        source_model="tiny",
        fast_options=FastDecodeOptions(compile=True, compile_backend="no-such-backend"),
    )
    settings = GenerationSettings(num_tokens=10, greedy=True)
    fast = encode_with_vlm(vlm, conversations[:1], settings, engine="fast")
    assert "compiling the decode step failed" in caplog.text and not vlm.fast_decoder().compiled
    assert_same_features(encode_with_vlm(vlm, conversations[:1], settings, engine="generate"), fast)
