"""Writes the shipped ComfyUI workflows from one Python description, so the two formats never drift.

    python workflows/build_workflows.py          # rewrites the files below; commit them

Outputs:
    workflows/thinkdiff_lvlm_in_context.json          UI format (version 0.4): drag into ComfyUI
    workflows/api/thinkdiff_lvlm_in_context.api.json  API format (POST /prompt): used by tests/integration
    workflows/input/thinkdiff_red_car.png, thinkdiff_blue_car.png   the in-context example pictures (copy them
                                                                    into ComfyUI's input folder)

The graph is the paper's ThinkDiff-LVLM recipe (recipe sections 4, 5, 10): Qwen2-VL reads "red: <red car>, blue:
<blue car>, green: ?", generates 128 tokens; their final-norm states go through the aligner into T5 space and replace
FLUX.1-dev's prompt tokens; the pooled vector is CLIP-L("") from an empty CLIPTextEncodeFlux; guidance 3.5, 28 euler
steps, 1024x1024, seed 42.

`widgets_values` are positional, in the order of each node's INPUT_TYPES (nodes/*.py, ComfyUI's nodes.py); the
frontend stores an extra value after an INT with control_after_generate (the seeds) and an "upload" value for
LoadImage. Those UI-only values are marked `ui_only` below and left out of the API format; PreviewAny's text box is the
reverse (`api_only`). tests/integration/test_browser.py checks both files against what the real frontend makes of them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw

WORKFLOWS_DIR = Path(__file__).resolve().parent
HF = "https://huggingface.co"


@dataclass
class Widget:
    name: str
    value: object
    ui_only: bool = False  # stored in the UI format only (control_after_generate, image upload)
    api_only: bool = False  # sent in the API prompt only (frontend widgets that are not saved)


@dataclass
class Node:
    id: int
    type: str
    pos: tuple[int, int]
    size: tuple[int, int]
    widgets: list[Widget] = field(default_factory=list)
    sockets: list[tuple[str, str]] = field(default_factory=list)  # input sockets (name, type), in INPUT_TYPES order
    outputs: list[tuple[str, str]] = field(default_factory=list)  # (name, type)
    models: list[dict] = field(default_factory=list)  # properties.models: download hints for the frontend
    title: str | None = None
    virtual: bool = False  # frontend-only (notes): not in the API format
    color: str | None = None
    bgcolor: str | None = None


@dataclass
class Link:
    id: int
    src: Node
    src_slot: int
    dst: Node
    dst_input: str

    @property
    def dst_slot(self) -> int:
        return [name for name, _ in self.dst.sockets].index(self.dst_input)

    @property
    def type(self) -> str:
        return self.src.outputs[self.src_slot][1]


@dataclass
class Workflow:
    name: str
    nodes: list[Node]
    links: list[Link]
    groups: list[dict] = field(default_factory=list)

    def ui(self) -> dict:
        nodes = []
        for order, node in enumerate(self.nodes):
            properties = {"Node name for S&R": node.type} if not node.virtual else {}
            if node.models:
                properties["models"] = node.models
            entry = {
                "id": node.id,
                "type": node.type,
                "pos": list(node.pos),
                "size": list(node.size),
                "flags": {},
                "order": order,
                "mode": 0,
                "inputs": [
                    {
                        "name": name,
                        "type": kind,
                        "link": next(
                            (link.id for link in self.links if link.dst is node and link.dst_input == name), None
                        ),
                    }
                    for name, kind in node.sockets
                ],
                "outputs": [
                    {
                        "name": name,
                        "type": kind,
                        "links": [link.id for link in self.links if link.src is node and link.src_slot == slot],
                    }
                    for slot, (name, kind) in enumerate(node.outputs)
                ],
                "properties": properties,
                "widgets_values": [widget.value for widget in node.widgets if not widget.api_only],
            }
            if node.title:
                entry["title"] = node.title
            if node.color:
                entry["color"], entry["bgcolor"] = node.color, node.bgcolor
            nodes.append(entry)
        return {
            "id": "6b1d3c52-7f0e-4c1a-9a51-7468696e6b64",  # fixed, so regenerating gives the same file
            "revision": 0,
            "last_node_id": max(node.id for node in self.nodes),
            "last_link_id": max(link.id for link in self.links),
            "nodes": nodes,
            "links": [
                [link.id, link.src.id, link.src_slot, link.dst.id, link.dst_slot, link.type] for link in self.links
            ],
            "groups": self.groups,
            "config": {},
            "extra": {"ds": {"scale": 0.75, "offset": [40, 60]}, "frontendVersion": "1.27.10"},
            "version": 0.4,
        }

    def api(self) -> dict:
        prompt = {}
        for node in self.nodes:
            if node.virtual:
                continue
            inputs: dict[str, object] = {w.name: w.value for w in node.widgets if not w.ui_only}
            for link in self.links:
                if link.dst is node:
                    inputs[link.dst_input] = [str(link.src.id), link.src_slot]
            prompt[str(node.id)] = {
                "class_type": node.type,
                "inputs": inputs,
                "_meta": {"title": node.title or node.type},
            }
        return prompt


# --- the ThinkDiff-LVLM in-context workflow ------------------------------------------------------------------------

NOTE = """# ThinkDiff-LVLM: in-context reasoning, then drawing

**What it does.** Qwen2-VL reads the two pictures with their words (*red* -> red car, *blue* -> blue car) and the query
word *green*, reasons, and generates 128 tokens. The **ThinkDiff aligner** maps those tokens' final-layer states into
FLUX's T5 space; they **replace** the text prompt (mode `replace`). The empty *CLIPTextEncodeFlux* only supplies
CLIP-L("") pooled and guidance 3.5, as in the paper. The VLM's text is shown in *Preview Any*.

**Models** (put them in these folders, then press `r`):

| file | folder | source |
|---|---|---|
| `Qwen2-VL-7B-Instruct/` (whole folder) | `models/LLM/` | [Qwen/Qwen2-VL-7B-Instruct](https://huggingface.co/Qwen/Qwen2-VL-7B-Instruct) |
| `thinkdiff_lvlm.pth` | `models/thinkdiff/` | [Mifucius/ThinkDiff](https://huggingface.co/Mifucius/ThinkDiff) |
| `flux1-dev.safetensors` | `models/diffusion_models/` | [black-forest-labs/FLUX.1-dev](https://huggingface.co/black-forest-labs/FLUX.1-dev) |
| `ae.safetensors` | `models/vae/` | same repository |
| `clip_l.safetensors`, `t5xxl_fp16.safetensors` | `models/text_encoders/` | [comfyanonymous/flux_text_encoders](https://huggingface.co/comfyanonymous/flux_text_encoders) |

The VLM is a folder, not one file (`hf` is huggingface_hub's CLI; older versions call it `huggingface-cli`):
`hf download Qwen/Qwen2-VL-7B-Instruct --local-dir models/LLM/Qwen2-VL-7B-Instruct`

**Inputs.** Copy `workflows/input/*.png` of this pack into ComfyUI's `input/` folder (or pick your own pictures and
words: one word per line, picture *k* goes with word *k*, the last word is the query).
"""


def thinkdiff_lvlm_in_context() -> Workflow:
    note = Node(
        1,
        "MarkdownNote",
        (-500, 0),
        (460, 500),
        [Widget("text", NOTE)],
        title="Read me: models and inputs",
        virtual=True,
    )
    image_red = Node(
        2,
        "LoadImage",
        (-500, 540),
        (220, 350),
        [Widget("image", "thinkdiff_red_car.png"), Widget("upload", "image", ui_only=True)],
        outputs=[("IMAGE", "IMAGE"), ("MASK", "MASK")],
        title="Load Image (word 1: red)",
    )
    image_blue = Node(
        3,
        "LoadImage",
        (-260, 540),
        (220, 350),
        [Widget("image", "thinkdiff_blue_car.png"), Widget("upload", "image", ui_only=True)],
        outputs=[("IMAGE", "IMAGE"), ("MASK", "MASK")],
        title="Load Image (word 2: blue)",
    )
    vlm_loader = Node(
        4,
        "ThinkDiffVLMLoader",
        (0, 0),
        (340, 180),
        [
            Widget("model", "Qwen2-VL-7B-Instruct"),
            Widget("dtype", "auto"),
            Widget("device", "auto"),
            Widget("attention", "sdpa"),
            Widget("trust_remote_code", False),
        ],
        outputs=[("vlm", "THINKDIFF_VLM")],
        # No properties.models here: the VLM is a folder, and the frontend compares hints with single files, so a
        # hint would always report it missing. The Read-me note gives the download command.
    )
    vlm_encode = Node(
        5,
        "ThinkDiffVLMEncode",
        (0, 220),
        (340, 340),
        [
            Widget("prompt", "red\nblue\ngreen"),
            Widget("layout", "in-context words"),
            Widget("num_tokens", 128),
            Widget("seed", 42),
            Widget("control_after_generate", "fixed", ui_only=True),
            Widget("temperature", 0.6),
            Widget("top_p", 0.9),
            Widget("greedy", False),
            Widget("keep_model_loaded", False),
        ],
        sockets=[
            ("vlm", "THINKDIFF_VLM"),
            ("image_1", "IMAGE"),
            ("image_2", "IMAGE"),
            ("image_3", "IMAGE"),
            ("image_4", "IMAGE"),
        ],
        outputs=[("features", "THINKDIFF_FEATURES"), ("text", "STRING")],
    )
    aligner_loader = Node(
        6,
        "ThinkDiffAlignerLoader",
        (400, 0),
        (340, 60),
        [Widget("aligner", "thinkdiff_lvlm.pth")],
        outputs=[("aligner", "THINKDIFF_ALIGNER")],
        models=[
            {
                "name": "thinkdiff_lvlm.pth",
                "url": f"{HF}/Mifucius/ThinkDiff/resolve/main/thinkdiff_lvlm.pth",
                "directory": "thinkdiff",
            }
        ],
    )
    clip_loader = Node(
        7,
        "DualCLIPLoader",
        (400, 110),
        (340, 130),
        [
            Widget("clip_name1", "clip_l.safetensors"),
            Widget("clip_name2", "t5xxl_fp16.safetensors"),
            Widget("type", "flux"),
            Widget("device", "default"),
        ],
        outputs=[("CLIP", "CLIP")],
        models=[
            {
                "name": "clip_l.safetensors",
                "url": f"{HF}/comfyanonymous/flux_text_encoders/resolve/main/clip_l.safetensors",
                "directory": "text_encoders",
            },
            {
                "name": "t5xxl_fp16.safetensors",
                "url": f"{HF}/comfyanonymous/flux_text_encoders/resolve/main/t5xxl_fp16.safetensors",
                "directory": "text_encoders",
            },
        ],
    )
    empty_text = Node(
        8,
        "CLIPTextEncodeFlux",
        (400, 280),
        (340, 170),
        [Widget("clip_l", ""), Widget("t5xxl", ""), Widget("guidance", 3.5)],
        sockets=[("clip", "CLIP")],
        outputs=[("CONDITIONING", "CONDITIONING")],
        title='Empty prompt (CLIP-L "" pooled)',
    )
    conditioning = Node(
        9,
        "ThinkDiffConditioning",
        (400, 490),
        (340, 120),
        [Widget("mode", "replace"), Widget("strength", 1.0)],
        sockets=[
            ("aligner", "THINKDIFF_ALIGNER"),
            ("features", "THINKDIFF_FEATURES"),
            ("conditioning", "CONDITIONING"),
        ],
        outputs=[("CONDITIONING", "CONDITIONING")],
    )
    preview_text = Node(
        10,
        "PreviewAny",
        (400, 650),
        (340, 240),
        # The frontend's read-only text box: not saved in the workflow, but sent (and ignored) in the API prompt.
        [Widget("preview", "", api_only=True)],
        sockets=[("source", "*")],
        title="VLM text",
    )
    unet_loader = Node(
        11,
        "UNETLoader",
        (800, 0),
        (320, 90),
        [Widget("unet_name", "flux1-dev.safetensors"), Widget("weight_dtype", "default")],
        outputs=[("MODEL", "MODEL")],
        models=[
            {
                "name": "flux1-dev.safetensors",
                "url": f"{HF}/black-forest-labs/FLUX.1-dev/resolve/main/flux1-dev.safetensors",
                "directory": "diffusion_models",
            }
        ],
    )
    zero_out = Node(
        12,
        "ConditioningZeroOut",
        (800, 130),
        (320, 30),
        sockets=[("conditioning", "CONDITIONING")],
        outputs=[("CONDITIONING", "CONDITIONING")],
    )
    latent = Node(
        13,
        "EmptySD3LatentImage",
        (800, 200),
        (320, 110),
        [Widget("width", 1024), Widget("height", 1024), Widget("batch_size", 1)],
        outputs=[("LATENT", "LATENT")],
    )
    sampler = Node(
        14,
        "KSampler",
        (800, 350),
        (320, 270),
        [
            Widget("seed", 42),
            Widget("control_after_generate", "fixed", ui_only=True),
            Widget("steps", 28),
            Widget("cfg", 1.0),
            Widget("sampler_name", "euler"),
            Widget("scheduler", "simple"),
            Widget("denoise", 1.0),
        ],
        sockets=[
            ("model", "MODEL"),
            ("positive", "CONDITIONING"),
            ("negative", "CONDITIONING"),
            ("latent_image", "LATENT"),
        ],
        outputs=[("LATENT", "LATENT")],
    )
    vae_loader = Node(
        15,
        "VAELoader",
        (1160, 0),
        (300, 60),
        [Widget("vae_name", "ae.safetensors")],
        outputs=[("VAE", "VAE")],
        models=[
            {
                "name": "ae.safetensors",
                "url": f"{HF}/black-forest-labs/FLUX.1-dev/resolve/main/ae.safetensors",
                "directory": "vae",
            }
        ],
    )
    decode = Node(
        16,
        "VAEDecode",
        (1160, 110),
        (300, 50),
        sockets=[("samples", "LATENT"), ("vae", "VAE")],
        outputs=[("IMAGE", "IMAGE")],
    )
    save = Node(
        17,
        "SaveImage",
        (1160, 200),
        (420, 460),
        [Widget("filename_prefix", "ThinkDiff")],
        sockets=[("images", "IMAGE")],
    )
    nodes = [
        note,
        image_red,
        image_blue,
        vlm_loader,
        vlm_encode,
        aligner_loader,
        clip_loader,
        empty_text,
        conditioning,
        preview_text,
        unet_loader,
        zero_out,
        latent,
        sampler,
        vae_loader,
        decode,
        save,
    ]
    wiring = [
        (vlm_loader, 0, vlm_encode, "vlm"),
        (image_red, 0, vlm_encode, "image_1"),
        (image_blue, 0, vlm_encode, "image_2"),
        (clip_loader, 0, empty_text, "clip"),
        (aligner_loader, 0, conditioning, "aligner"),
        (vlm_encode, 0, conditioning, "features"),
        (empty_text, 0, conditioning, "conditioning"),
        (vlm_encode, 1, preview_text, "source"),
        (empty_text, 0, zero_out, "conditioning"),
        (unet_loader, 0, sampler, "model"),
        (conditioning, 0, sampler, "positive"),
        (zero_out, 0, sampler, "negative"),
        (latent, 0, sampler, "latent_image"),
        (sampler, 0, decode, "samples"),
        (vae_loader, 0, decode, "vae"),
        (decode, 0, save, "images"),
    ]
    links = [Link(index, src, slot, dst, name) for index, (src, slot, dst, name) in enumerate(wiring, start=1)]
    groups = [
        {
            "id": 1,
            "title": "ThinkDiff: VLM reasoning -> aligned T5-space tokens",
            "bounding": [-20, -80, 780, 1000],
            "color": "#3f789e",
            "flags": {},
        },
        {"id": 2, "title": "FLUX.1-dev", "bounding": [780, -80, 820, 760], "color": "#8A8", "flags": {}},
    ]
    return Workflow("thinkdiff_lvlm_in_context", nodes, links, groups)


WORKFLOWS = [thinkdiff_lvlm_in_context]


# --- the in-context example pictures -------------------------------------------------------------------------------


def draw_toy_car(color: str, size: int = 256) -> Image.Image:
    """A simple drawn toy car (body, cabin, windows, wheels) in `color` on a light background."""
    image = Image.new("RGB", (size, size), (246, 246, 240))
    draw = ImageDraw.Draw(image)
    s = size / 256
    draw.rectangle([0, 196 * s, size, size], fill=(205, 205, 200))  # ground
    draw.rounded_rectangle(
        [28 * s, 118 * s, 228 * s, 182 * s], radius=int(18 * s), fill=color, outline="black", width=max(1, int(3 * s))
    )
    draw.polygon(
        [(72 * s, 120 * s), (96 * s, 78 * s), (168 * s, 78 * s), (194 * s, 120 * s)], fill=color, outline="black"
    )
    draw.polygon([(88 * s, 116 * s), (104 * s, 88 * s), (128 * s, 88 * s), (128 * s, 116 * s)], fill=(190, 225, 245))
    draw.polygon([(136 * s, 116 * s), (136 * s, 88 * s), (162 * s, 88 * s), (180 * s, 116 * s)], fill=(190, 225, 245))
    for center in (76, 180):
        draw.ellipse([(center - 24) * s, 158 * s, (center + 24) * s, 206 * s], fill=(40, 40, 40))
        draw.ellipse([(center - 10) * s, 172 * s, (center + 10) * s, 192 * s], fill=(170, 170, 170))
    draw.rectangle([214 * s, 130 * s, 226 * s, 142 * s], fill=(255, 230, 120))  # headlight
    return image


INPUT_IMAGES = {"thinkdiff_red_car.png": (220, 40, 40), "thinkdiff_blue_car.png": (40, 90, 220)}


def main() -> int:
    (WORKFLOWS_DIR / "api").mkdir(exist_ok=True)
    (WORKFLOWS_DIR / "input").mkdir(exist_ok=True)
    for build in WORKFLOWS:
        workflow = build()
        ui_path = WORKFLOWS_DIR / f"{workflow.name}.json"
        api_path = WORKFLOWS_DIR / "api" / f"{workflow.name}.api.json"
        ui_path.write_text(json.dumps(workflow.ui(), indent=2, ensure_ascii=False) + "\n")
        api_path.write_text(json.dumps(workflow.api(), indent=2, ensure_ascii=False) + "\n")
        print(f"wrote {ui_path.relative_to(WORKFLOWS_DIR.parent)} and {api_path.relative_to(WORKFLOWS_DIR.parent)}")
    for name, color in INPUT_IMAGES.items():
        path = WORKFLOWS_DIR / "input" / name
        draw_toy_car(color).save(path, optimize=True)
        print(f"wrote {path.relative_to(WORKFLOWS_DIR.parent)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
