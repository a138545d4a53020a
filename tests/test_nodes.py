"""The node classes as ComfyUI sees them (contract), and run through their methods on tiny real models."""

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, comfy_adapter
from thinkdiff_core import standin
from thinkdiff_core.errors import (
    AlignerMismatchError,
    CheckpointError,
    MissingDependencyError,
    ModelFolderError,
    PromptError,
    ThinkDiffError,
)
from thinkdiff_core.images import image_tensor_from_pil

ROOT = Path(__file__).resolve().parents[1]

# Saved workflows address widgets by position and links by name: this table is a public contract.
CONTRACT = {
    "ThinkDiffVLMLoader": (
        ["model", "dtype", "device", "attention", "trust_remote_code", "engine", "quantization"],
        [],
        ("THINKDIFF_VLM",),
    ),
    "ThinkDiffAlignerLoader": (["aligner"], [], ("THINKDIFF_ALIGNER",)),
    "ThinkDiffVLMEncode": (
        ["vlm", "prompt", "layout", "num_tokens", "seed", "temperature", "top_p", "greedy", "keep_model_loaded"],
        ["image_1", "image_2", "image_3", "image_4"],
        ("THINKDIFF_FEATURES", "STRING"),
    ),
    "ThinkDiffConditioning": (
        ["aligner", "features", "mode", "strength"],
        ["conditioning", "text_tokens", "family"],  # family: added last, saved workflows keep loading
        ("CONDITIONING",),
    ),
    "ThinkDiffVisionLoader": (["encoder", "dtype", "device"], [], ("THINKDIFF_VISION",)),
    "ThinkDiffVisionEncode": (
        ["vision", "image_1", "token_grid"],
        ["image_2", "image_3", "image_4"],
        ("THINKDIFF_FEATURES",),
    ),
}


@pytest.mark.parametrize("name", sorted(CONTRACT))
def test_node_contract(name, standalone_models):
    cls = NODE_CLASS_MAPPINGS[name]
    required, optional, returns = CONTRACT[name]
    inputs = cls.INPUT_TYPES()
    assert list(inputs["required"]) == required
    assert list(inputs.get("optional", {})) == optional
    assert cls.RETURN_TYPES == returns
    assert callable(getattr(cls, cls.FUNCTION)) and cls.CATEGORY == "ThinkDiff"
    assert NODE_DISPLAY_NAME_MAPPINGS[name].startswith("ThinkDiff ")
    assert cls.DESCRIPTION


def test_loader_lists_come_from_the_model_folders(standalone_models):
    assert NODE_CLASS_MAPPINGS["ThinkDiffVLMLoader"].INPUT_TYPES()["required"]["model"][0] == ["tiny-qwen2-vl"]
    assert NODE_CLASS_MAPPINGS["ThinkDiffAlignerLoader"].INPUT_TYPES()["required"]["aligner"][0] == [
        "tiny-lvlm.safetensors"
    ]


@pytest.fixture
def graph(standalone_models, shape_images):
    (vlm,) = NODE_CLASS_MAPPINGS["ThinkDiffVLMLoader"]().load("tiny-qwen2-vl", "float32", "cpu", "sdpa", False)
    (aligner,) = NODE_CLASS_MAPPINGS["ThinkDiffAlignerLoader"]().load("tiny-lvlm.safetensors")
    images = {"image_1": image_tensor_from_pil(shape_images[0]), "image_2": image_tensor_from_pil(shape_images[1])}
    return vlm, aligner, images


def encode(vlm, images, prompt="red\nblue\ngreen", layout="in-context words", num_tokens=6, greedy=True):
    return NODE_CLASS_MAPPINGS["ThinkDiffVLMEncode"]().encode(
        vlm, prompt, layout, num_tokens, 42, 0.6, 0.9, greedy, False, **images
    )


def test_graph_through_the_node_classes(graph):
    vlm, aligner, images = graph
    result = encode(vlm, images)
    features, text = result["result"]
    assert result["ui"]["text"] == [text] and isinstance(text, str)
    assert features.hidden_states.shape == (1, 6, 64) and features.hidden_states.device.type == "cpu"
    base = [[torch.randn(1, 256, 4096), {"pooled_output": torch.randn(1, 768), "guidance": 3.5}]]
    (conditioning,) = NODE_CLASS_MAPPINGS["ThinkDiffConditioning"]().apply(aligner, features, "replace", 1.0, base)
    cond, options = conditioning[0]
    assert cond.shape == (1, 6, 4096) and options["pooled_output"] is base[0][1]["pooled_output"]
    (appended,) = NODE_CLASS_MAPPINGS["ThinkDiffConditioning"]().apply(aligner, features, "append", 1.0, base)
    assert appended[0][0].shape == (1, 262, 4096)
    # the aligned tokens are the aligner applied to the VLM features
    torch.testing.assert_close(cond, aligner.model(features.hidden_states), atol=1e-5, rtol=1e-5)


def test_the_aligner_stays_where_it_was_loaded(graph):
    """Loaded once to the compute device under model management; runs neither copy nor move it (it used to go
    CPU -> GPU -> CPU on every run), and the tokens land where ComfyUI keeps conditioning."""
    vlm, aligner, images = graph
    features = encode(vlm, images)["result"][0]
    weights = [parameter.data_ptr() for parameter in aligner.model.parameters()]
    for _ in range(2):
        (conditioning,) = NODE_CLASS_MAPPINGS["ThinkDiffConditioning"]().apply(aligner, features, "replace", 1.0)
        assert [parameter.data_ptr() for parameter in aligner.model.parameters()] == weights
        assert all(parameter.device == aligner.load_device for parameter in aligner.model.parameters())
        assert conditioning[0][0].device == comfy_adapter.intermediate_device()


def test_picture_labels_follow_the_layout(graph):
    """The official CoBSAT prompt labels pictures ("Picture k: "); the single-image recipe does not."""
    vlm, _, images = graph
    tokenizer = vlm.model.processor.tokenizer
    in_context = encode(vlm, images)["result"][0]
    free = encode(vlm, {"image_1": images["image_1"]}, prompt="describe <image>", layout="free text")["result"][0]
    assert "Picture 1: " in tokenizer.decode(in_context.prompt_ids[0])
    assert "Picture" not in tokenizer.decode(free.prompt_ids[0])


def test_image_batch_counts_as_several_images(graph):
    vlm, _, images = graph
    batch = {"image_1": torch.cat([images["image_1"], images["image_2"]])}
    a = encode(vlm, batch)["result"][0]
    b = encode(vlm, images)["result"][0]
    assert torch.equal(a.generated_ids, b.generated_ids)


def test_wrong_image_count_is_a_prompt_error(graph):
    vlm, _, images = graph
    with pytest.raises(PromptError, match="one word per image"):
        encode(vlm, {"image_1": images["image_1"]})


def test_aligner_of_other_width_is_refused_with_the_fix(graph, tmp_path):
    vlm, _, images = graph
    features = encode(vlm, images)["result"][0]
    wrong = standin.build_aligner(input_dim=3584, output_dim=32, source_model="Qwen/Qwen2-VL-7B-Instruct")
    with pytest.raises(
        AlignerMismatchError, match="expects 3584-dim features .trained on Qwen/Qwen2-VL-7B-Instruct.*64-dim"
    ):
        NODE_CLASS_MAPPINGS["ThinkDiffConditioning"]().apply(
            comfy_adapter.manage(wrong, wrong, torch.device("cpu")), features, "replace", 1.0
        )


def test_model_names_cannot_leave_the_model_folders(standalone_models):
    for name in ["../LLM/tiny-qwen2-vl", "/etc/passwd", ""]:
        with pytest.raises(CheckpointError, match="not a name inside models/thinkdiff"):
            NODE_CLASS_MAPPINGS["ThinkDiffAlignerLoader"]().load(name)
    with pytest.raises(ModelFolderError, match="not a name inside models/LLM"):
        NODE_CLASS_MAPPINGS["ThinkDiffVLMLoader"]().load("../thinkdiff", "float32", "cpu", "sdpa", False)
    with pytest.raises(ModelFolderError, match="was not found in models/LLM"):
        NODE_CLASS_MAPPINGS["ThinkDiffVLMLoader"]().load("missing-model", "float32", "cpu", "sdpa", False)


def test_official_pth_is_listed_and_loads(standalone_models, tmp_path):
    aligner = standin.build_aligner(input_dim=1408, output_dim=16)
    state = aligner.state_dict()
    keys = {"linear_in": "mm_projector.0", "linear_out": "mm_projector.2", "norm": "mm_projector.3"}
    official = {f"{keys[k.split('.')[0]]}.{k.split('.')[1]}": v for k, v in state.items()}
    path = standalone_models / "thinkdiff" / "sub" / "thinkdiff_clip.pth"
    path.parent.mkdir()
    torch.save({"model": official, "epoch": 1}, path)
    try:
        assert "sub/thinkdiff_clip.pth" in comfy_adapter.list_aligners()
        (loaded,) = NODE_CLASS_MAPPINGS["ThinkDiffAlignerLoader"]().load("sub/thinkdiff_clip.pth")
        assert loaded.model.spec.variant == "clip"
    finally:
        path.unlink()
        path.parent.rmdir()


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True)


def test_core_imports_no_comfyui_and_no_heavy_libraries():
    result = run_python(
        """
        import sys, thinkdiff_core, thinkdiff_core.vlm, thinkdiff_core.conditioning, thinkdiff_core.checkpoints
        bad = [m for m in sys.modules if m.split('.')[0] in ('comfy', 'folder_paths', 'server', 'nodes', 'transformers', 'diffusers')]
        print(bad)
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_pack_imports_as_comfyui_loads_it():
    """ComfyUI imports the pack folder as a package while its own top-level `nodes` module is loaded."""
    result = run_python(
        f"""
        import importlib.util, sys, types
        sys.modules['nodes'] = types.ModuleType('nodes')  # ComfyUI's own nodes.py occupies this name
        spec = importlib.util.spec_from_file_location('ComfyUI-ThinkDiff', {str(ROOT / "__init__.py")!r},
                                                      submodule_search_locations=[{str(ROOT)!r}])
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        print(sorted(module.NODE_CLASS_MAPPINGS))
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(sorted(CONTRACT))


def test_standalone_adapter_without_comfyui():
    assert comfy_adapter.IN_COMFYUI is False
    assert importlib.util.find_spec("comfy") is None
    assert comfy_adapter.compute_device("cpu").type == "cpu"
    if not torch.cuda.is_available():  # a raw "Found no NVIDIA driver" before
        with pytest.raises(ThinkDiffError, match="device 'cuda' needs a CUDA GPU.*Choose device auto or cpu"):
            comfy_adapter.compute_device("cuda")


def test_loader_engine_choice_reaches_the_encode_node_and_release_frees_its_buffers(graph, standalone_models):
    vlm, _aligner, images = graph
    (fast_vlm,) = NODE_CLASS_MAPPINGS["ThinkDiffVLMLoader"]().load(
        "tiny-qwen2-vl", "float32", "cpu", "sdpa", False, "fast", "none"
    )
    assert fast_vlm.model.engine == "fast"
    fast = encode(fast_vlm, images, num_tokens=8)["result"][0]
    reference = encode(vlm, images, num_tokens=8)["result"][0]  # auto on cpu: generate
    assert torch.equal(fast.generated_ids, reference.generated_ids)
    assert not fast_vlm.model.fast_decoder()._states  # keep_model_loaded off: the engine's buffers went too


def test_quantized_load_errors_name_the_fix(standalone_models):
    loader = NODE_CLASS_MAPPINGS["ThinkDiffVLMLoader"]()
    with pytest.raises(ThinkDiffError, match="CUDA GPU only.*quantization 'none'"):
        loader.load("tiny-qwen2-vl", "float32", "cpu", "sdpa", False, "auto", "8-bit")
    from thinkdiff_core.hf_compat import import_transformers
    from thinkdiff_core.vlm_loader import quantization_kwargs

    if importlib.util.find_spec("bitsandbytes") is None:
        with pytest.raises(MissingDependencyError, match="pip install bitsandbytes"):
            quantization_kwargs(import_transformers(), "4-bit", torch.bfloat16, torch.device("cuda", 0))
    with pytest.raises(ValueError, match="quantization must be one of"):
        quantization_kwargs(import_transformers(), "3-bit", torch.bfloat16, torch.device("cpu"))
