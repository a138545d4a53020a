"""The pack inside a real, headless ComfyUI server (opt-in: set COMFYUI_PATH; see scripts/comfyui_integration.sh).

What runs: `python main.py --cpu` from COMFYUI_PATH with an extra_model_paths.yaml that adds a custom_nodes folder
holding a symlink to this repository and model folders holding stand-in weights. The tests check that the pack imports
(no "(IMPORT FAILED)"), that /object_info lists the four ThinkDiff nodes and knows every input the shipped API workflow
uses, that the shipped workflow (workflows/api/thinkdiff_lvlm_in_context.api.json) runs to a saved image through
ComfyUI's FLUX sampler, and that a bad aligner gives an execution error naming the cause while the server keeps
answering.

Stand-ins (random weights, built locally and cached; see conftest.py and comfy_standins.py):
- VLM: the tiny Qwen2-VL of thinkdiff_core.standin (hidden 64) as models/LLM/tiny-qwen2-vl-STANDIN.
- Aligner: thinkdiff_core.save_aligner(standin.build_aligner(64 -> 4096)). The workflow's official
  thinkdiff_lvlm.pth is 3584 -> 4096, so a matching stand-in needs a different file.
- FLUX.1-dev: ComfyUI's own Flux class at its hard-coded width (3072, 24 heads, context 4096) with 1 double +
  1 single block, loaded by UNETLoader. FLUX VAE: ComfyUI's own AutoencodingEngine, full size, loaded by VAELoader.
- Text encoders: ComfyUI builds T5-XXL from a fixed config (4.7 B parameters), too heavy for a CPU test. The
  DualCLIPLoader -> CLIPTextEncodeFlux("", guidance 3.5) branch only supplies CLIP-L("") pooled and guidance 3.5
  (its T5 tokens are replaced by the aligned tokens). It becomes CLIPLoader(stand-in CLIP-L, "stable_diffusion") ->
  CLIPTextEncode("") -> FluxGuidance(3.5): the same CLIP-L code path, the same (1, 768) pooled width and the same
  guidance, but no T5. (One difference: the SD1 CLIP path returns the projected pooled vector, FLUX's clip_l path
  the unprojected one; both are 768 wide.) FluxGuidance keeps the id of CLIPTextEncodeFlux, so every link stays.
The ThinkDiff nodes and the KSampler keep every input of the shipped workflow except the model file names above;
the KSampler runs 2 steps instead of 28 and the latent is 64x64 instead of 1024x1024.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.comfyui  # skipped by conftest.py unless COMFYUI_PATH is set

API_WORKFLOW = Path(__file__).resolve().parents[2] / "workflows" / "api" / "thinkdiff_lvlm_in_context.api.json"
THINKDIFF_NODES = ("ThinkDiffVLMLoader", "ThinkDiffAlignerLoader", "ThinkDiffVLMEncode", "ThinkDiffConditioning")
NOT_AN_ALIGNER = "not-an-aligner-STANDIN.safetensors"
WRONG_WIDTH_ALIGNER = "aligner-48-dim-STANDIN.safetensors"
TEST_STEPS, TEST_SIZE = 2, 64
# Widgets the frontend adds and sends in the prompt, unknown to (and ignored by) the server.
FRONTEND_ONLY_INPUTS = {"PreviewAny": {"preview"}}


def shipped_prompt() -> dict:
    return json.loads(API_WORKFLOW.read_text())


def node_id(prompt: dict, class_type: str) -> str:
    ids = [key for key, node in prompt.items() if node["class_type"] == class_type]
    assert len(ids) == 1, f"expected one {class_type} in the workflow, found {ids}"
    return ids[0]


def standin_prompt(standins, aligner: str | None = None) -> dict:
    """The shipped API workflow with the stand-in substitutions described in the module docstring."""
    prompt = copy.deepcopy(shipped_prompt())
    prompt[node_id(prompt, "ThinkDiffVLMLoader")]["inputs"]["model"] = standins.vlm
    prompt[node_id(prompt, "ThinkDiffAlignerLoader")]["inputs"]["aligner"] = aligner or standins.aligner
    prompt[node_id(prompt, "UNETLoader")]["inputs"]["unet_name"] = standins.flux
    prompt[node_id(prompt, "VAELoader")]["inputs"]["vae_name"] = standins.vae
    clip_id, text_id = node_id(prompt, "DualCLIPLoader"), node_id(prompt, "CLIPTextEncodeFlux")
    text_inputs = prompt[text_id]["inputs"]
    prompt[clip_id] = {
        "class_type": "CLIPLoader",
        "inputs": {"clip_name": standins.clip_l, "type": "stable_diffusion", "device": "default"},
    }
    prompt["clip_l_encode"] = {
        "class_type": "CLIPTextEncode",
        "inputs": {"text": text_inputs["clip_l"], "clip": [clip_id, 0]},
    }
    prompt[text_id] = {
        "class_type": "FluxGuidance",
        "inputs": {"conditioning": ["clip_l_encode", 0], "guidance": text_inputs["guidance"]},
    }
    prompt[node_id(prompt, "KSampler")]["inputs"]["steps"] = TEST_STEPS
    latent = prompt[node_id(prompt, "EmptySD3LatentImage")]["inputs"]
    latent["width"] = latent["height"] = TEST_SIZE
    return prompt


@pytest.fixture(scope="module")
def server(standins, new_comfy_home, start_comfyui):
    import torch
    from safetensors.torch import save_file

    from thinkdiff_core import save_aligner, standin

    home = new_comfy_home()
    standins.install(home)
    save_file({"decoder.conv_in.weight": torch.zeros(8, 4, 3, 3)}, str(home.models / "thinkdiff" / NOT_AN_ALIGNER))
    save_aligner(standin.build_aligner(input_dim=48, output_dim=4096), home.models / "thinkdiff" / WRONG_WIDTH_ALIGNER)
    empty_frontend = home.root / "frontend-empty"  # no frontend package needed for the API
    empty_frontend.mkdir()
    return start_comfyui(home, front_end_root=empty_frontend)


def test_pack_imports_and_registers_its_nodes(server, standins):
    assert "ComfyUI-ThinkDiff" in server.log(), f"the pack was not loaded at all:\n{server.log_tail()}"
    assert not server.pack_import_failures(), "\n".join(server.pack_import_failures())
    object_info = server.get("/object_info")
    for name in THINKDIFF_NODES:
        assert name in object_info, f"{name} missing from /object_info"
        assert object_info[name]["category"] == "ThinkDiff"
    assert standins.vlm in object_info["ThinkDiffVLMLoader"]["input"]["required"]["model"][0]
    assert standins.aligner in object_info["ThinkDiffAlignerLoader"]["input"]["required"]["aligner"][0]
    assert object_info["ThinkDiffVLMEncode"]["output"] == ["THINKDIFF_FEATURES", "STRING"]


def test_shipped_api_workflow_uses_known_nodes_and_inputs(server):
    """Every class and input of the shipped API workflow exists in this ComfyUI (catches drift and renames)."""
    object_info = server.get("/object_info")
    for key, node in shipped_prompt().items():
        info = object_info.get(node["class_type"])
        assert info is not None, f"node {key}: unknown class {node['class_type']}"
        known = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        unknown = set(node["inputs"]) - set(known) - FRONTEND_ONLY_INPUTS.get(node["class_type"], set())
        assert not unknown, f"node {key} ({node['class_type']}): unknown inputs {unknown}"
        missing = set(info["input"].get("required", {})) - set(node["inputs"])
        assert not missing, f"node {key} ({node['class_type']}): required inputs not set: {missing}"


def test_standin_substitutions_keep_the_thinkdiff_subgraph_and_sampler(standins):
    shipped, test_copy = shipped_prompt(), standin_prompt(standins)
    allowed = {"ThinkDiffVLMLoader": {"model"}, "ThinkDiffAlignerLoader": {"aligner"}, "KSampler": {"steps"}}
    for key, node in shipped.items():
        if node["class_type"] in (*THINKDIFF_NODES, "KSampler"):
            changed = {name for name, value in node["inputs"].items() if test_copy[key]["inputs"][name] != value}
            assert changed <= allowed.get(node["class_type"], set()), f"{node['class_type']} changed: {changed}"


def test_standin_workflow_runs_through_flux_sampler(server, standins):
    started = time.perf_counter()
    status, reply = server.queue(standin_prompt(standins))
    assert status == 200 and not reply.get("node_errors"), f"queueing failed ({status}): {reply}\n{server.log_tail()}"
    entry = server.wait_for_history(reply["prompt_id"])
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
