"""Every shipped workflow (its API-format copy) runs through the ThinkDiff node classes on CPU, in CI.

ComfyUI is not installed in CI, so the graph is executed here in dependency order: ThinkDiff nodes are the real
classes; the few core ComfyUI nodes the workflows use are replaced by their standalone equivalents on tiny diffusers
pipelines of each base (FLUX.1, SD3.5, Chroma: CLIPTextEncodeFlux / CLIPTextEncodeSD3 / CLIPTextEncode -> the
pipeline's encode_prompt at ComfyUI's T5 length, T5TokenizerOptions -> that length, KSampler + VAEDecode -> the
pipeline, ...). Model names are mapped to tiny stand-ins and sizes shrunk; every other input is the workflow's own. The same workflows run
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
from thinkdiff_core.standin_bases import build_base_pipeline
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
    pipes = {
        "flux": standin.build_flux_pipeline(),
        "sd3": build_base_pipeline("sd3"),
        "chroma": build_base_pipeline("chroma"),
    }
    yield {"pipe": pipes["flux"], "pipes": pipes, "out": root / "output"}
    comfy_adapter.set_models_root(None)


def image_tensor(name: str) -> torch.Tensor:
    return image_tensor_from_pil(Image.open(WORKFLOWS / "input" / name))


class Clip:
    """A CLIP output: the stand-in pipeline whose encoders it holds, and T5TokenizerOptions' settings."""

    def __init__(self, pipe, min_length: int | None = None, min_padding: int = 0) -> None:
        self.pipe, self.min_length, self.min_padding = pipe, min_length, min_padding


class Executor:
    """Runs an API-format prompt: real ThinkDiff nodes, standalone equivalents for core nodes."""

    def __init__(self, prompt: dict, pipes: dict, out_dir: Path) -> None:
        self.prompt, self.pipes, self.out_dir = prompt, pipes, out_dir
        self.pipe = pipes["flux"]
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

    def core_UNETLoader(self, unet_name, weight_dtype):
        return (self.pipes["chroma" if "chroma" in unet_name.lower() else "flux"],)

    def core_CheckpointLoaderSimple(self, ckpt_name):
        assert ckpt_name.startswith("sd3"), ckpt_name
        return (self.pipes["sd3"], None, self.pipes["sd3"])  # MODEL, CLIP (none in SD3.5's file), VAE

    def core_ModelSamplingSD3(self, model, shift):
        assert shift == 3.0
        return (model,)

    def core_VAELoader(self, **_):
        return (None,)  # the pipeline decodes

    def core_DualCLIPLoader(self, type, **_):
        assert type == "flux"
        return (Clip(self.pipes["flux"]),)

    def core_TripleCLIPLoader(self, **_):
        return (Clip(self.pipes["sd3"]),)

    def core_CLIPLoader(self, clip_name, type, device):
        assert type == "chroma" and "t5xxl" in clip_name
        return (Clip(self.pipes["chroma"]),)

    def core_T5TokenizerOptions(self, clip, min_padding, min_length):
        return (Clip(clip.pipe, min_length or None, min_padding),)

    def core_CLIPTextEncodeFlux(self, clip, clip_l, t5xxl, guidance):
        assert clip_l == t5xxl, "the workflows give both encoders the same text"
        # ComfyUI pads T5 to at least 256 tokens for FLUX, or to T5TokenizerOptions' min_length; so does this
        length = clip.min_length or 256
        return (flux.text_conditioning(clip.pipe, t5xxl, guidance=guidance, max_sequence_length=length),)

    def core_CLIPTextEncodeSD3(self, clip, clip_l, clip_g, t5xxl, empty_padding):
        assert clip_l == clip_g == t5xxl, "the workflows give the three encoders the same text"
        assert t5xxl or empty_padding == "empty_prompt", "an empty box with 'none' drops the encoders in ComfyUI"
        # SD3's T5 pads to at least 77 tokens (sd3_clip.py), or to T5TokenizerOptions' min_length
        return (flux.text_conditioning(clip.pipe, t5xxl, max_sequence_length=clip.min_length or 77),)

    def core_CLIPTextEncode(self, clip, text):
        # Chroma's encoder (pixart_t5.py) is unpadded and sends no mask; T5TokenizerOptions pads to min_length
        ((cond, options),) = flux.text_conditioning(clip.pipe, text, None, max_sequence_length=clip.min_length or 64)
        kept = cond.shape[1] if clip.min_length else max(1, int(options["attention_mask"].sum()))
        return ([[cond[:, :kept], {"pooled_output": None}]],)

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
        family = flux.pipeline_family(model)
        if family == "flux":
            assert cfg == 1.0 and sampler_name == "euler" and scheduler == "simple", "FLUX-dev settings of the recipe"
        else:  # SD3.5 and Chroma: real CFG against the workflow's empty prompt, which must be that model's
            assert cfg > 1.0 and sampler_name == "euler"
            pooled = negative[0][1]["pooled_output"]
            assert (pooled is None) == (family == "chroma") and (pooled is None or pooled.shape[-1] == 2048)
        image = flux.render(
            model,
            positive,
            steps=STEPS,
            seed=seed,
            width=latent_image["width"],
            height=latent_image["height"],
            guidance=None if family == "flux" else cfg,
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
    executor = Executor(prompt, standins["pipes"], standins["out"])
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
    executor = Executor(prompt, standins["pipes"], standins["out"])
    executor.run()
    (conditioning_id,) = [i for i, n in prompt.items() if n["class_type"] == "ThinkDiffConditioning"]
    cond, options = executor.output(conditioning_id)[0][0]
    assert cond.shape == (1, MAX_VLM_TOKENS, 4096)  # only the aligned tokens (mode replace)
    assert options["guidance"] == 3.5
    # pooled = CLIP-L(""), from the empty CLIPTextEncodeFlux
    empty = flux.text_conditioning(standins["pipe"], "")[0][1]["pooled_output"]
    torch.testing.assert_close(options["pooled_output"], empty)


CLIP_WORKFLOWS = {  # name: (pictures, CLIP-L/G tokens in front)
    "thinkdiff_clip_style": (1, 0),
    "thinkdiff_clip_compose": (2, 0),
    "thinkdiff_sd35_clip_compose": (2, 77),
    "thinkdiff_chroma_clip_compose": (2, 0),
}


@pytest.mark.parametrize("name", sorted(CLIP_WORKFLOWS))
def test_clip_workflows_encode_the_text_at_128_tokens(name, standins):
    """The recipe's layout: 65 aligned tokens per picture, then the text's T5 tokens encoded at 128 (T5TokenizerOptions
    min_length 128, not trimmed); SD3.5 keeps its 77 CLIP-L/G tokens in front."""
    prompt = json.loads((WORKFLOWS / "api" / f"{name}.api.json").read_text())
    executor = Executor(prompt, standins["pipes"], standins["out"])
    executor.run()
    (options_id,) = [i for i, n in prompt.items() if n["class_type"] == "T5TokenizerOptions"]
    assert prompt[options_id]["inputs"] == {**prompt[options_id]["inputs"], "min_length": 128, "min_padding": 0}
    (node_id,) = [i for i, n in prompt.items() if n["class_type"] == "ThinkDiffConditioning"]
    assert prompt[node_id]["inputs"]["mode"] == "prepend" and prompt[node_id]["inputs"]["text_tokens"] == 0
    pictures, clip_tokens = CLIP_WORKFLOWS[name]
    cond = executor.output(node_id)[0][0][0]
    assert cond.shape[1] == clip_tokens + 65 * pictures + 128


@pytest.mark.parametrize("name, family", [("sd35", "sd3"), ("chroma", "chroma")])
def test_other_base_lvlm_workflows(name, family, standins):
    prompt = json.loads((WORKFLOWS / "api" / f"thinkdiff_{name}_lvlm_in_context.api.json").read_text())
    executor = Executor(prompt, standins["pipes"], standins["out"])
    executor.run()
    (node_id,) = [i for i, n in prompt.items() if n["class_type"] == "ThinkDiffConditioning"]
    assert prompt[node_id]["inputs"]["family"] == family and prompt[node_id]["inputs"]["mode"] == "replace"
    cond, options = executor.output(node_id)[0][0]
    if family == "sd3":  # CLIP-L/G("") in front, then only the aligned tokens; pooled of ""
        assert cond.shape[1] == 77 + MAX_VLM_TOKENS and options["pooled_output"].shape == (1, 2048)
    else:  # the aligned tokens are the whole prompt
        assert cond.shape[1] == MAX_VLM_TOKENS and options["pooled_output"] is None
