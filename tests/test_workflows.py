"""Every shipped workflow (its API-format copy) runs through the ThinkDiff node classes on CPU, in CI.

ComfyUI is not installed in CI, so the graph is executed here in dependency order: ThinkDiff nodes are the real
classes; the few core ComfyUI nodes the workflows use are replaced by their standalone equivalents on a tiny diffusers
FLUX pipeline (CLIPTextEncodeFlux -> FluxPipeline.encode_prompt, KSampler + VAEDecode -> FluxPipeline, ...). Model
names are mapped to tiny stand-ins and sizes shrunk; every other input is the workflow's own. The same workflows run
in a real ComfyUI in tests/integration (opt-in).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from nodes import NODE_CLASS_MAPPINGS, comfy_adapter
from thinkdiff_core import AlignerSpec, ThinkDiffAligner, flux, save_aligner, standin
from thinkdiff_core.images import image_tensor_from_pil
from thinkdiff_core.vision import extract_vision_tower

WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"
API_FILES = sorted((WORKFLOWS / "api").glob("*.api.json"))
SIZE, STEPS, MAX_VLM_TOKENS = 32, 1, 8


@pytest.fixture(scope="module")
def standins(tmp_path_factory, tiny_qwen2vl_dir):
    """Model folders with one stand-in per loader, and the tiny FLUX pipeline in place of ComfyUI's FLUX."""
    root = tmp_path_factory.mktemp("workflow_models")
    (root / "LLM").mkdir()
    (root / "LLM" / "tiny-qwen2-vl").symlink_to(tiny_qwen2vl_dir)
    save_aligner(standin.build_aligner(input_dim=64, output_dim=4096), root / "thinkdiff" / "lvlm.safetensors")
    torch.manual_seed(0)
    save_aligner(ThinkDiffAligner(AlignerSpec("clip", 48, 4096)), root / "thinkdiff" / "clip.safetensors")
    standin.build_blip2_vision(root / "blip2", full_blip2_layout=True)
    extract_vision_tower(root / "blip2", root / "clip_vision" / "tower.safetensors")
    comfy_adapter.set_models_root(root)
    yield {"pipe": standin.build_flux_pipeline(), "out": root / "output"}
    comfy_adapter.set_models_root(None)


def image_tensor(name: str) -> torch.Tensor:
    return image_tensor_from_pil(Image.open(WORKFLOWS / "input" / name))


class Executor:
    """Runs an API-format prompt: real ThinkDiff nodes, standalone equivalents for core nodes."""

    def __init__(self, prompt: dict, pipe, out_dir: Path) -> None:
        self.prompt, self.pipe, self.out_dir = prompt, pipe, out_dir
        self.results: dict[str, tuple] = {}
        self.saved: dict[str, Image.Image] = {}
        self.ui: dict[str, dict] = {}

    def run(self) -> None:
        for node_id in self.prompt:
            self.output(node_id)

    def output(self, node_id: str) -> tuple:
        if node_id not in self.results:
            node = self.prompt[node_id]
            inputs = {
                name: self.output(value[0])[value[1]] if isinstance(value, list) else value
                for name, value in node["inputs"].items()
            }
            self.results[node_id] = self.execute(node_id, node["class_type"], inputs)
        return self.results[node_id]

    def execute(self, node_id: str, class_type: str, inputs: dict) -> tuple:
        if class_type.startswith("ThinkDiff"):
            return self.thinkdiff(node_id, class_type, inputs)
        core = getattr(self, f"core_{class_type}", None)
        assert core is not None, f"the test executor does not know core node {class_type}: add its equivalent"
        return core(**inputs)

    def thinkdiff(self, node_id: str, class_type: str, inputs: dict) -> tuple:
        standin_names = {
            "ThinkDiffVLMLoader": ("model", "tiny-qwen2-vl"),
            "ThinkDiffVisionLoader": ("encoder", "tower.safetensors"),
        }
        if class_type in standin_names:
            key, name = standin_names[class_type]
            inputs.update({key: name, "dtype": "float32", "device": "cpu"})
        if class_type == "ThinkDiffAlignerLoader":
            inputs["aligner"] = "clip.safetensors" if "clip" in inputs["aligner"] else "lvlm.safetensors"
        if class_type == "ThinkDiffVLMEncode":
            inputs["num_tokens"] = min(inputs["num_tokens"], MAX_VLM_TOKENS)
        node = NODE_CLASS_MAPPINGS[class_type]()
        result = getattr(node, node.FUNCTION)(**inputs)
        if isinstance(result, dict):
            self.ui[node_id] = result["ui"]
            result = result["result"]
        assert len(result) == len(node.RETURN_TYPES)
        return result

    # --- standalone equivalents of the core nodes the workflows use ---------------------------------------------
    def core_LoadImage(self, image, **_):
        return (image_tensor(image), None)

    def core_UNETLoader(self, **_):
        return (self.pipe,)

    def core_VAELoader(self, **_):
        return (self.pipe,)

    def core_DualCLIPLoader(self, **_):
        return (self.pipe,)

    def core_CLIPTextEncodeFlux(self, clip, clip_l, t5xxl, guidance):
        assert clip_l == t5xxl, "the workflows give both encoders the same text"
        # ComfyUI pads T5 to at least 256 tokens; so does this equivalent
        return (flux.text_conditioning(clip, t5xxl, guidance=guidance, max_sequence_length=256),)

    def core_ConditioningZeroOut(self, conditioning):
        return (
            [
                [torch.zeros_like(c), {**o, "pooled_output": torch.zeros_like(o["pooled_output"])}]
                for c, o in conditioning
            ],
        )

    def core_EmptySD3LatentImage(self, width, height, batch_size):
        assert width % 16 == 0 and height % 16 == 0
        return ({"width": SIZE, "height": SIZE, "batch_size": batch_size},)

    def core_KSampler(
        self, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise
    ):
        assert cfg == 1.0 and sampler_name == "euler" and scheduler == "simple", "FLUX-dev settings of the recipe"
        image = flux.render(
            model, positive, steps=STEPS, seed=seed, width=latent_image["width"], height=latent_image["height"]
        )
        return ({"image": image, "conditioning": positive},)

    def core_VAEDecode(self, samples, vae):
        return (samples,)

    def core_SaveImage(self, images, filename_prefix):
        self.saved[filename_prefix] = images["image"]
        return ()

    def core_PreviewAny(self, source, **_):
        return (str(source),)


@pytest.mark.parametrize("api_file", API_FILES, ids=[p.name.removesuffix(".api.json") for p in API_FILES])
def test_workflow_runs_through_the_node_classes(api_file, standins):
    prompt = json.loads(api_file.read_text())
    executor = Executor(prompt, standins["pipe"], standins["out"])
    executor.run()
    assert executor.saved, "the workflow saved no image"
    for prefix, image in executor.saved.items():
        assert image.size == (SIZE, SIZE), prefix
        assert len(set(image.getdata())) > 10, f"{prefix}: a blank image"
    conditionings = [executor.output(i)[0] for i, n in prompt.items() if n["class_type"] == "ThinkDiffConditioning"]
    assert conditionings and all(c[0][0].shape[-1] == 4096 for c in conditionings)
    for node_id, node in prompt.items():
        if node["class_type"] == "ThinkDiffVLMEncode":
            assert executor.ui[node_id]["text"] == [executor.output(node_id)[1]]


def test_lvlm_workflow_is_the_papers_setting(standins):
    prompt = json.loads((WORKFLOWS / "api" / "thinkdiff_lvlm_in_context.api.json").read_text())
    executor = Executor(prompt, standins["pipe"], standins["out"])
    executor.run()
    (conditioning_id,) = [i for i, n in prompt.items() if n["class_type"] == "ThinkDiffConditioning"]
    cond, options = executor.output(conditioning_id)[0][0]
    assert cond.shape == (1, MAX_VLM_TOKENS, 4096)  # only the aligned tokens (mode replace)
    assert options["guidance"] == 3.5
    # pooled = CLIP-L(""), from the empty CLIPTextEncodeFlux
    empty = flux.text_conditioning(standins["pipe"], "")[0][1]["pooled_output"]
    torch.testing.assert_close(options["pooled_output"], empty)
