"""The pack inside a real, headless ComfyUI server (opt-in: set COMFYUI_PATH; see scripts/comfyui_integration.sh).

What runs: `python main.py --cpu` from COMFYUI_PATH with an extra_model_paths.yaml that adds a custom_nodes folder
holding a symlink to this repository (and test-only nodes, below) and model folders holding stand-in weights.
The tests check that the pack imports (no "(IMPORT FAILED)"), that /object_info lists the six ThinkDiff nodes and
knows every input the shipped API workflows use, that every shipped workflow (workflows/api/*.api.json) runs to saved
images through ComfyUI's FLUX, SD3 (MMDiT) or Chroma sampler, that a bad aligner or a non-T5 text conditioning gives
an execution error naming the cause while the server keeps answering, and that Cancel (POST /interrupt) stops a VLM
generation.

Stand-ins (random weights, built locally and cached; see conftest.py and comfy_standins.py):
- VLM: the tiny Qwen2-VL of thinkdiff_core.standin (hidden 64) as models/LLM/tiny-qwen2-vl-STANDIN.
- LVLM aligner: thinkdiff_core.save_aligner(standin.build_aligner(64 -> 4096)). The workflow's official
  thinkdiff_lvlm.pth is 3584 -> 4096, so a matching stand-in needs a different file.
- Vision encoder: a tiny BLIP-2 vision tower (standin.build_blip2_vision, hidden 48) written to a single file by
  thinkdiff_core.vision.extract_vision_tower, as users make the real one, under the workflows' own encoder name
  (models/clip_vision/blip2_vision_tower.safetensors). CLIP aligner: variant "clip", 48 -> 4096, its own file name
  (the official thinkdiff_clip.pth is 1408 -> 4096).
- FLUX.1-dev: ComfyUI's own Flux class at its hard-coded width (3072, 24 heads, context 4096) with 1 double +
  1 single block, loaded by UNETLoader. FLUX VAE: ComfyUI's own AutoencodingEngine, full size, loaded by VAELoader.
- Text encoders: ComfyUI builds T5-XXL from a fixed config (4.7 B parameters), too heavy for a CPU test, and no core
  node of 0.3.64 gives a 4096-wide text conditioning cheaply. Each DualCLIPLoader becomes CLIPLoader(stand-in
  CLIP-L, "stable_diffusion") and each CLIPTextEncodeFlux(clip_l, t5xxl, guidance) becomes
  CLIPTextEncode(clip_l) -> FluxGuidance(guidance): the same CLIP-L code path, the same (1, 768) pooled width and
  the same guidance, but no T5 (the SD1 CLIP path returns the projected pooled vector, FLUX's clip_l path the
  unprojected one; both are 768 wide). FluxGuidance keeps the id of CLIPTextEncodeFlux, so every link stays, and a
  clip_l fed by a link (the three-modes workflow's VLM text) stays a link.
  * ThinkDiffConditioning reads the model family from its base and rightly refuses 768-wide CLIP-L states
    (test_clip_l_conditioning_in_prepend_mode_names_t5 checks that message: wiring an SD1 text encode into the
    node is a real user mistake). So a test-only node, ThinkDiffTestT5Width (conftest.py), goes between
    CLIPTextEncode and FluxGuidance: it pads the CLIP-L states with zero features to 4096 and with zero tokens to
    256, as ComfyUI's FLUX T5 pads. A T5TokenizerOptions node between the loader and the encode (the
    ThinkDiff-CLIP workflows' 128-token T5 setting) stays; on the CLIP-L stand-in it has no T5 to act on.
    Everything else runs as shipped: replace and prepend, text_tokens 128, all three branches of the three-modes
    workflow with one shared VLM run.
- SD3.5 (Large): a CheckpointLoaderSimple file with ComfyUI's own MMDiT (OpenAISignatureMMDITWrapper), config from
  this ComfyUI's detection of an SD3.5 Large sketch (16 channels, patch 2, qk RMS norm, context 4096, pooled 2048,
  pos_embed 192x192) at depth 2 (hidden 128, the last joint block context pre-only), and the VAE above under
  first_stage_model (SD3's and FLUX's VAEs share the 16-channel AutoencoderKL config); ModelSamplingSD3, the
  checkpoint's VAE output and EmptySD3LatentImage run as shipped.
  * Text encoders: TripleCLIPLoader builds CLIP-G (32 layers, 1280 wide) and T5-XXL from fixed configs. It becomes
    CLIPLoader(stand-in CLIP-L, "stable_diffusion"), and each CLIPTextEncodeSD3 becomes CLIPTextEncode(its clip_l
    text) -> ThinkDiffTestSD3Layout (conftest.py), which keeps the encode's id (every link stays) and gives ComfyUI's
    SD3 layout: a 77-token CLIP block (CLIP-L's states, CLIP-G's 1280 features zero as ComfyUI does without CLIP-G,
    zero-padded to 4096) and then 77 T5-like tokens (CLIP-L's states tiled to 4096, nonzero past column 2048);
    pooled_output CLIP-L's 768 ++ 1280 zeros = (1, 2048). empty_padding and the clip_g / t5xxl texts are dropped.
- Chroma: ComfyUI's own Chroma class, config from this ComfyUI's detection (hidden 3072, context 4096, the 5-layer
  5120-wide guidance approximator) with 1 double + 1 single block (631 M parameters), loaded by UNETLoader; the
  FLUX VAE stand-in by VAELoader.
  * Text encoder: CLIPLoader(T5-XXL, type "chroma") becomes CLIPLoader(stand-in CLIP-L, "stable_diffusion"), and
    each CLIPTextEncode gets a ThinkDiffTestT5Only after it (under the encode's id): CLIP-L's states tiled to 4096,
    pooled_output None, as ComfyUI's T5-only encoders give.
  A ThinkDiffTestConditioningProbe on each KSampler input (a side branch, the sampler's own links unchanged)
  reports the layout the sampler got, which test_sd35_and_chroma_workflows_run_to_saved_images checks.
The ThinkDiff nodes, KSamplers, VAEDecode, SaveImage, ModelSamplingSD3, EmptySD3LatentImage and T5TokenizerOptions
keep every input of the shipped workflows except the model file names above; the KSamplers run 2 steps instead of
28 or 40 and the latent is 64x64 instead of 1024x1024 (checked by
test_standin_substitutions_keep_the_thinkdiff_subgraph_and_sampler)."""

from __future__ import annotations

import asyncio
import copy
import json
import time
import uuid
from pathlib import Path

import pytest

from .conftest import install_test_nodes

pytestmark = pytest.mark.comfyui  # skipped by conftest.py unless COMFYUI_PATH is set

API_DIR = Path(__file__).resolve().parents[2] / "workflows" / "api"
API_WORKFLOWS = sorted(path.name.removesuffix(".api.json") for path in API_DIR.glob("*.api.json"))
LVLM, CLIP_STYLE, CLIP_COMPOSE, THREE_MODES = (
    "thinkdiff_lvlm_in_context",
    "thinkdiff_clip_style",
    "thinkdiff_clip_compose",
    "thinkdiff_three_modes",
)
FLUX_WORKFLOWS = [LVLM, CLIP_STYLE, CLIP_COMPOSE, THREE_MODES]
SD35_WORKFLOWS = ["thinkdiff_sd35_lvlm_in_context", "thinkdiff_sd35_clip_compose"]
CHROMA_WORKFLOWS = ["thinkdiff_chroma_lvlm_in_context", "thinkdiff_chroma_clip_compose"]
RUN_WORKFLOWS = FLUX_WORKFLOWS + SD35_WORKFLOWS + CHROMA_WORKFLOWS  # every shipped workflow, run on stand-ins
THINKDIFF_NODES = (
    "ThinkDiffVLMLoader",
    "ThinkDiffAlignerLoader",
    "ThinkDiffVLMEncode",
    "ThinkDiffConditioning",
    "ThinkDiffVisionLoader",
    "ThinkDiffVisionEncode",
)
NOT_AN_ALIGNER = "not-an-aligner-STANDIN.safetensors"
WRONG_WIDTH_ALIGNER = "aligner-48-dim-STANDIN.safetensors"
TEST_STEPS, TEST_SIZE = 2, 64
# Widgets the frontend adds and sends in the prompt, unknown to (and ignored by) the server.
FRONTEND_ONLY_INPUTS = {"PreviewAny": {"preview"}}


def shipped_prompt(name: str = LVLM) -> dict:
    return json.loads((API_DIR / f"{name}.api.json").read_text())


def node_ids(prompt: dict, class_type: str) -> list[str]:
    return [key for key, node in prompt.items() if node["class_type"] == class_type]


def node_id(prompt: dict, class_type: str) -> str:
    ids = node_ids(prompt, class_type)
    assert len(ids) == 1, f"expected one {class_type} in the workflow, found {ids}"
    return ids[0]


def standin_prompt(standins, name: str = LVLM, aligner: str | None = None, t5_width: bool | None = None) -> dict:
    """A shipped API workflow with the stand-in substitutions described in the module docstring.

    t5_width: put ThinkDiffTestT5Width after each CLIP-L encode of a FLUX workflow (default: yes)."""
    prompt = copy.deepcopy(shipped_prompt(name))
    if t5_width is None:
        t5_width = True
    for key in node_ids(prompt, "ThinkDiffVLMLoader"):
        prompt[key]["inputs"]["model"] = standins.vlm
    for key in node_ids(prompt, "ThinkDiffAlignerLoader"):
        clip_variant = prompt[key]["inputs"]["aligner"] == "thinkdiff_clip.pth"
        prompt[key]["inputs"]["aligner"] = aligner or (standins.clip_aligner if clip_variant else standins.aligner)
    for key in node_ids(prompt, "ThinkDiffVisionLoader"):
        assert prompt[key]["inputs"]["encoder"] == standins.vision  # installed under the workflow's own name
    family = workflow_family(name)
    if family == "sd3":
        prompt[node_id(prompt, "CheckpointLoaderSimple")]["inputs"]["ckpt_name"] = standins.sd35
        clip_id, loader_class, encode_class, layout_class = (
            "",
            "TripleCLIPLoader",
            "CLIPTextEncodeSD3",
            "ThinkDiffTestSD3Layout",
        )
    else:
        unet_name = standins.chroma if family == "chroma" else standins.flux
        prompt[node_id(prompt, "UNETLoader")]["inputs"]["unet_name"] = unet_name
        prompt[node_id(prompt, "VAELoader")]["inputs"]["vae_name"] = standins.vae
        if family == "chroma":
            loader_class, encode_class, layout_class = "CLIPLoader", "CLIPTextEncode", "ThinkDiffTestT5Only"
        else:
            loader_class, encode_class, layout_class = "DualCLIPLoader", "CLIPTextEncodeFlux", "ThinkDiffTestT5Width"
    clip_id = node_id(prompt, loader_class)
    if family == "chroma":
        assert prompt[clip_id]["inputs"]["type"] == "chroma"
    prompt[clip_id] = {
        "class_type": "CLIPLoader",
        "inputs": {"clip_name": standins.clip_l, "type": "stable_diffusion", "device": "default"},
    }
    for text_id in node_ids(prompt, encode_class):
        text_inputs = prompt[text_id]["inputs"]
        clip_source = text_inputs["clip"]  # the loader, or T5TokenizerOptions fed by it
        if clip_source != [clip_id, 0]:
            assert prompt[clip_source[0]]["class_type"] == "T5TokenizerOptions"
            assert prompt[clip_source[0]]["inputs"]["clip"] == [clip_id, 0]
        text = text_inputs["text"] if family == "chroma" else text_inputs["clip_l"]
        prompt[f"{text_id}_clip_l"] = {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": clip_source}}
        encoded = f"{text_id}_clip_l"
        if family == "flux":
            if t5_width:
                prompt[f"{text_id}_t5_width"] = {"class_type": layout_class, "inputs": {"conditioning": [encoded, 0]}}
                encoded = f"{text_id}_t5_width"
            # FluxGuidance keeps the id of CLIPTextEncodeFlux, so every link stays.
            prompt[text_id] = {
                "class_type": "FluxGuidance",
                "inputs": {"conditioning": [encoded, 0], "guidance": text_inputs["guidance"]},
            }
        else:  # the layout node keeps the id of the encode node, so every link stays
            prompt[text_id] = {"class_type": layout_class, "inputs": {"conditioning": [encoded, 0]}}
    for key in node_ids(prompt, "KSampler"):
        prompt[key]["inputs"]["steps"] = TEST_STEPS
    latent = prompt[node_id(prompt, "EmptySD3LatentImage")]["inputs"]
    latent["width"] = latent["height"] = TEST_SIZE
    return prompt


def workflow_family(name: str) -> str:
    return "sd3" if name.startswith("thinkdiff_sd35_") else "chroma" if name.startswith("thinkdiff_chroma_") else "flux"


def probe_sampler_conditioning(prompt: dict) -> dict[str, str]:
    """Adds a ThinkDiffTestConditioningProbe on every KSampler's positive and negative input (a side branch: the
    sampler still gets its input straight from the shipped node). Returns {probe id: what it probes}."""
    probes = {}
    for key in node_ids(prompt, "KSampler"):
        for side in ("positive", "negative"):
            probe_id = f"{key}_probe_{side}"
            prompt[probe_id] = {
                "class_type": "ThinkDiffTestConditioningProbe",
                "inputs": {"conditioning": prompt[key]["inputs"][side]},
            }
            probes[probe_id] = side
    return probes


@pytest.fixture(scope="module")
def server(standins, new_comfy_home, start_comfyui):
    import torch
    from safetensors.torch import save_file

    from thinkdiff_core import save_aligner, standin

    home = new_comfy_home()
    standins.install(home)
    install_test_nodes(home)
    save_file({"decoder.conv_in.weight": torch.zeros(8, 4, 3, 3)}, str(home.models / "thinkdiff" / NOT_AN_ALIGNER))
    save_aligner(standin.build_aligner(input_dim=48, output_dim=4096), home.models / "thinkdiff" / WRONG_WIDTH_ALIGNER)
    empty_frontend = home.root / "frontend-empty"  # no frontend package needed for the API
    empty_frontend.mkdir()
    return start_comfyui(home, front_end_root=empty_frontend)


def run_prompt(server, prompt: dict, timeout: float = 300.0) -> dict:
    status, reply = server.queue(prompt)
    assert status == 200 and not reply.get("node_errors"), f"queueing failed ({status}): {reply}\n{server.log_tail()}"
    return server.wait_for_history(reply["prompt_id"], timeout=timeout)


def test_pack_imports_and_registers_its_nodes(server, standins):
    assert "ComfyUI-ThinkDiff" in server.log(), f"the pack was not loaded at all:\n{server.log_tail()}"
    assert not server.pack_import_failures(), "\n".join(server.pack_import_failures())
    object_info = server.get("/object_info")
    for name in THINKDIFF_NODES:
        assert name in object_info, f"{name} missing from /object_info"
        assert object_info[name]["category"] == "ThinkDiff"
    assert "ThinkDiffTestT5Width" in object_info, f"the test-only node did not load:\n{server.log_tail()}"
    assert standins.vlm in object_info["ThinkDiffVLMLoader"]["input"]["required"]["model"][0]
    aligners = object_info["ThinkDiffAlignerLoader"]["input"]["required"]["aligner"][0]
    assert standins.aligner in aligners and standins.clip_aligner in aligners
    assert standins.vision in object_info["ThinkDiffVisionLoader"]["input"]["required"]["encoder"][0]
    assert object_info["ThinkDiffVLMEncode"]["output"] == ["THINKDIFF_FEATURES", "STRING"]
    assert object_info["ThinkDiffVisionEncode"]["output"] == ["THINKDIFF_FEATURES"]


@pytest.mark.parametrize("name", API_WORKFLOWS)
def test_shipped_api_workflow_uses_known_nodes_and_inputs(server, name):
    """Every class and input of a shipped API workflow exists in this ComfyUI (catches drift and renames)."""
    object_info = server.get("/object_info")
    for key, node in shipped_prompt(name).items():
        info = object_info.get(node["class_type"])
        assert info is not None, f"node {key}: unknown class {node['class_type']}"
        known = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        unknown = set(node["inputs"]) - set(known) - FRONTEND_ONLY_INPUTS.get(node["class_type"], set())
        assert not unknown, f"node {key} ({node['class_type']}): unknown inputs {unknown}"
        missing = set(info["input"].get("required", {})) - set(node["inputs"])
        assert not missing, f"node {key} ({node['class_type']}): required inputs not set: {missing}"


def test_every_shipped_workflow_is_run(standins):
    assert sorted(RUN_WORKFLOWS) == API_WORKFLOWS


KEPT_NODES = (
    *THINKDIFF_NODES,
    "KSampler",
    "SaveImage",
    "VAEDecode",
    "PreviewAny",
    "ModelSamplingSD3",
    "EmptySD3LatentImage",
    "T5TokenizerOptions",
    "LoadImage",
)


@pytest.mark.parametrize("name", RUN_WORKFLOWS)
def test_standin_substitutions_keep_the_thinkdiff_subgraph_and_sampler(standins, name):
    shipped, test_copy = shipped_prompt(name), standin_prompt(standins, name)
    allowed = {
        "ThinkDiffVLMLoader": {"model"},
        "ThinkDiffAlignerLoader": {"aligner"},
        "KSampler": {"steps"},
        "EmptySD3LatentImage": {"width", "height"},
    }
    for key, node in shipped.items():
        if node["class_type"] in KEPT_NODES:
            assert test_copy[key]["class_type"] == node["class_type"]
            changed = {name for name, value in node["inputs"].items() if test_copy[key]["inputs"][name] != value}
            assert changed <= allowed.get(node["class_type"], set()), f"{node['class_type']} changed: {changed}"


def test_standin_workflow_runs_through_flux_sampler(server, standins):
    started = time.perf_counter()
    entry = run_prompt(server, standin_prompt(standins))
    elapsed = time.perf_counter() - started
    assert entry["status"]["status_str"] == "success", f"{server.execution_error(entry)}\n{server.log_tail()}"
    prompt = shipped_prompt()
    outputs = entry["outputs"]
    images = outputs[node_id(prompt, "SaveImage")]["images"]
    assert len(images) == 1 and (server.home.output / images[0]["subfolder"] / images[0]["filename"]).is_file()
    vlm_text = outputs[node_id(prompt, "ThinkDiffVLMEncode")]["text"][0]
    assert isinstance(vlm_text, str) and vlm_text  # gibberish from the tiny VLM, shown on the node
    assert outputs[node_id(prompt, "PreviewAny")]["text"] == [vlm_text]
    print(
        f"[comfyui] stand-in workflow: success in {elapsed:.1f} s (VLM 128 tokens, FLUX {TEST_STEPS} steps at {TEST_SIZE}px)"
    )


def test_fast_engine_runs_under_comfyuis_executor(server, standins):
    """The loader's engine set to "fast" (what "auto" picks on a GPU): the LVLM workflow runs through ComfyUI's model
    management, progress and FLUX sampler to a saved image, greedy, with the same text as engine "generate"."""
    texts = {}
    for engine in ("fast", "generate"):
        prompt = standin_prompt(standins)
        prompt[node_id(prompt, "ThinkDiffVLMLoader")]["inputs"]["engine"] = engine
        prompt[node_id(prompt, "ThinkDiffVLMEncode")]["inputs"].update(greedy=True, num_tokens=24)
        entry = run_prompt(server, prompt)
        assert entry["status"]["status_str"] == "success", f"{server.execution_error(entry)}\n{server.log_tail()}"
        images = entry["outputs"][node_id(prompt, "SaveImage")]["images"]
        assert len(images) == 1 and (server.home.output / images[0]["subfolder"] / images[0]["filename"]).is_file()
        texts[engine] = entry["outputs"][node_id(prompt, "ThinkDiffVLMEncode")]["text"][0]
    assert texts["fast"] == texts["generate"] and texts["fast"]


@pytest.mark.parametrize("name", [CLIP_STYLE, CLIP_COMPOSE, THREE_MODES])
def test_new_workflows_run_through_flux_sampler(server, standins, name):
    """ThinkDiff-CLIP (one and two pictures, prepend, text_tokens 128) and the three-modes workflow (all three
    branches from one VLM run, the VLM's text wired into the text encoder) end in saved images."""
    started = time.perf_counter()
    entry = run_prompt(server, standin_prompt(standins, name))
    elapsed = time.perf_counter() - started
    assert entry["status"]["status_str"] == "success", f"{server.execution_error(entry)}\n{server.log_tail()}"
    prompt = shipped_prompt(name)
    saves = node_ids(prompt, "SaveImage")
    assert len(saves) == (3 if name == THREE_MODES else 1)
    for key in saves:
        images = entry["outputs"][key]["images"]
        assert len(images) == 1 and (server.home.output / images[0]["subfolder"] / images[0]["filename"]).is_file()
        assert images[0]["filename"].startswith(prompt[key]["inputs"]["filename_prefix"])
    if name == THREE_MODES:
        vlm_text = entry["outputs"][node_id(prompt, "ThinkDiffVLMEncode")]["text"][0]
        assert entry["outputs"][node_id(prompt, "PreviewAny")]["text"] == [vlm_text]
    print(
        f"[comfyui] {name}: success in {elapsed:.1f} s ({len(saves)} image(s), FLUX {TEST_STEPS} steps at {TEST_SIZE}px)"
    )


@pytest.mark.parametrize("name", SD35_WORKFLOWS + CHROMA_WORKFLOWS)
def test_sd35_and_chroma_workflows_run_to_saved_images(server, standins, name):
    """The SD3.5 workflows through ComfyUI's SD3 MMDiT (CheckpointLoaderSimple, ModelSamplingSD3, the checkpoint's VAE)
    and the Chroma ones through ComfyUI's Chroma (UNETLoader, the FLUX VAE) end in saved images of the latent's size;
    a probe on each sampler input shows the conditioning the sampler got: 4096 wide; SD3: the 77-token CLIP block in
    front and a (1, 2048) pooled vector; Chroma: no CLIP block and no pooled vector; ThinkDiff's tokens in the
    positive one (replace: the VLM's aligned tokens instead of T5's; prepend: the vision tokens before T5's)."""
    from PIL import Image

    family = workflow_family(name)
    prompt = standin_prompt(standins, name)
    probes = probe_sampler_conditioning(prompt)
    started = time.perf_counter()
    entry = run_prompt(server, prompt)
    elapsed = time.perf_counter() - started
    assert entry["status"]["status_str"] == "success", f"{server.execution_error(entry)}\n{server.log_tail()}"
    shipped = shipped_prompt(name)
    save_id = node_id(shipped, "SaveImage")
    images = entry["outputs"][save_id]["images"]
    assert len(images) == 1 and images[0]["filename"].startswith(shipped[save_id]["inputs"]["filename_prefix"])
    path = server.home.output / images[0]["subfolder"] / images[0]["filename"]
    with Image.open(path) as image:
        assert image.size == (TEST_SIZE, TEST_SIZE) and image.mode == "RGB"
    model_class = {"sd3": "SD3", "chroma": "Chroma"}[family]  # comfy.model_base's class, as ComfyUI logs it
    assert f"Requested to load {model_class}\n" in server.log(), f"no {model_class} model loaded:\n{server.log_tail()}"
    layouts = {side: json.loads(entry["outputs"][probe_id]["layout"][0]) for probe_id, side in probes.items()}
    negative_tokens = layouts["negative"][0]["shape"][1]
    for side, layout in layouts.items():
        assert len(layout) == 1 and layout[0]["finite"], (side, layout)
        batch, tokens, width = layout[0]["shape"]
        assert batch == 1 and width == 4096, (side, layout)
        if family == "sd3":
            assert layout[0]["clip_tokens"] == 77 and layout[0]["pooled"] == [1, 2048], (side, layout)
        else:
            assert layout[0]["clip_tokens"] == 0 and layout[0]["pooled"] is None, (side, layout)
    positive_tokens = layouts["positive"][0]["shape"][1]
    mode = shipped[node_id(shipped, "ThinkDiffConditioning")]["inputs"]["mode"]
    base_tokens = 2 * 77 if family == "sd3" else 77  # the stand-in encoders' token counts (CLIP block + T5 part)
    assert negative_tokens == base_tokens, layouts
    if mode == "prepend":  # the 65 vision tokens of each picture before the base's T5 tokens
        assert positive_tokens == base_tokens + 2 * 65, layouts
    else:  # replace: the T5 tokens are ThinkDiff's (the VLM's generated tokens, aligned), the CLIP block stays
        generated = positive_tokens - (77 if family == "sd3" else 0)
        num_tokens = shipped[node_id(shipped, "ThinkDiffVLMEncode")]["inputs"]["num_tokens"]
        assert 0 < generated <= num_tokens, layouts
    print(
        f"[comfyui] {name}: success in {elapsed:.1f} s, conditioning {layouts['positive'][0]['shape']} "
        f"(CLIP block {layouts['positive'][0]['clip_tokens']}, pooled {layouts['positive'][0]['pooled']}), "
        f"{TEST_STEPS} steps at {TEST_SIZE}px"
    )


def test_clip_l_conditioning_in_prepend_mode_names_t5(server, standins):
    """A 768-wide text conditioning (an SD1 CLIP text encode wired into the node) is refused, naming T5-XXL."""
    entry = run_prompt(server, standin_prompt(standins, CLIP_STYLE, t5_width=False))
    assert entry["status"]["status_str"] == "error"
    error = server.execution_error(entry)
    assert error is not None and error["node_type"] == "ThinkDiffConditioning", error
    for fragment in ("the base conditioning is 768 wide", "4096 wide (T5-XXL space)"):
        assert fragment in error["exception_message"], error["exception_message"]
    assert server.get("/queue") == {"queue_running": [], "queue_pending": []}


@pytest.mark.parametrize(
    "aligner, failing_node, expected",
    [
        (
            NOT_AN_ALIGNER,
            "ThinkDiffAlignerLoader",
            ["is not a ThinkDiff aligner", "linear_in.weight", "decoder.conv_in.weight"],
        ),
        (WRONG_WIDTH_ALIGNER, "ThinkDiffConditioning", ["expects 48-dim features", "64-dim features"]),
    ],
    ids=["not-an-aligner", "wrong-input-width"],
)
def test_bad_aligner_gives_an_error_naming_the_cause(server, standins, aligner, failing_node, expected):
    status, reply = server.queue(standin_prompt(standins, aligner=aligner))
    assert status == 200, f"expected the prompt to pass validation and fail while running: {reply}"
    entry = server.wait_for_history(reply["prompt_id"])
    assert entry["status"]["status_str"] == "error"
    error = server.execution_error(entry)
    assert error is not None and error["node_type"] == failing_node, error
    for fragment in expected:
        assert fragment in error["exception_message"], error["exception_message"]
    # The server keeps answering, with nothing left running.
    assert server.get("/system_stats")["system"]["comfyui_version"]
    assert server.get("/queue") == {"queue_running": [], "queue_pending": []}
    assert "ThinkDiffConditioning" in server.get("/object_info/ThinkDiffConditioning")


CANCEL_TOKENS = 1024  # the node's maximum: long enough on the tiny VLM to interrupt mid-generation


def test_cancel_stops_vlm_generation(server, standins):
    """Cancel (POST /interrupt, what the UI's Cancel button sends) while ThinkDiffVLMEncode generates: the node stops
    within a few tokens' time (the per-token progress callback is a cancel point), /history shows the prompt
    interrupted at that node, and the server keeps answering with an empty queue."""
    aiohttp = pytest.importorskip("aiohttp")  # one of ComfyUI's own requirements
    shipped = shipped_prompt()
    encode_id = node_id(shipped, "ThinkDiffVLMEncode")
    encode = copy.deepcopy(shipped[encode_id])
    encode["inputs"].update(num_tokens=CANCEL_TOKENS, vlm=["loader", 0], seed=1234)
    prompt = {
        "loader": {
            "class_type": "ThinkDiffVLMLoader",
            "inputs": {**shipped[node_id(shipped, "ThinkDiffVLMLoader")]["inputs"], "model": standins.vlm},
        },
        **{
            shipped[encode_id]["inputs"][key][0]: shipped[shipped[encode_id]["inputs"][key][0]]
            for key in ("image_1", "image_2")
        },
        encode_id: encode,
        "preview": {"class_type": "PreviewAny", "inputs": {"source": [encode_id, 1]}},
    }
    client_id = uuid.uuid4().hex

    async def run() -> dict:
        seen: dict = {"progress": 0, "executing": False}
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"{server.url}/ws?clientId={client_id}", heartbeat=30) as ws:
                async with session.post(
                    f"{server.url}/prompt", json={"prompt": prompt, "client_id": client_id}
                ) as response:
                    reply = await response.json()
                    assert response.status == 200 and not reply.get("node_errors"), reply
                prompt_id = reply["prompt_id"]
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline:
                    message = await ws.receive(timeout=max(1.0, deadline - time.monotonic()))
                    if message.type != aiohttp.WSMsgType.TEXT:
                        continue  # binary preview frames
                    event = json.loads(message.data)
                    data = event.get("data", {})
                    if data.get("prompt_id") not in (None, prompt_id):
                        continue
                    if event["type"] == "executing" and data.get("node") == encode_id:
                        seen["executing"] = True
                    elif event["type"] == "progress" and data.get("node") == encode_id:
                        seen["progress"] = data["value"]
                        if data["value"] >= 8 and "interrupted_at" not in seen:
                            async with session.post(
                                f"{server.url}/interrupt", json={"prompt_id": prompt_id}
                            ) as response:
                                assert response.status == 200
                            seen["interrupted_at"] = time.monotonic()
                            seen["progress_at_interrupt"] = data["value"]
                    elif event["type"] in ("execution_interrupted", "execution_error", "execution_success"):
                        seen["end"] = event["type"]
                        seen["end_data"] = data
                        seen["ended_at"] = time.monotonic()
                        break
                seen["prompt_id"] = prompt_id
        return seen

    seen = asyncio.run(run())
    assert seen["executing"], seen
    assert "interrupted_at" in seen, f"never saw the VLM's progress: {seen}\n{server.log_tail()}"
    assert seen.get("end") == "execution_interrupted", f"{seen}\n{server.log_tail()}"
    assert seen["end_data"]["node_id"] == encode_id and seen["end_data"]["node_type"] == "ThinkDiffVLMEncode"
    stop_seconds = seen["ended_at"] - seen["interrupted_at"]
    assert seen["progress"] < CANCEL_TOKENS, seen  # it stopped before the last token
    assert stop_seconds < 10, f"took {stop_seconds:.1f} s to stop"
    entry = server.wait_for_history(seen["prompt_id"], timeout=30)
    assert entry["status"]["status_str"] == "error"
    assert any(kind == "execution_interrupted" for kind, _ in entry["status"]["messages"])
    assert server.get("/system_stats")["system"]["comfyui_version"]
    assert server.get("/queue") == {"queue_running": [], "queue_pending": []}
    print(
        f"[comfyui] cancel: interrupted at token {seen['progress_at_interrupt']}/{CANCEL_TOKENS}, last progress "
        f"{seen['progress']}, stopped {stop_seconds:.2f} s after POST /interrupt"
    )
