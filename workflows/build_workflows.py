"""Writes the shipped ComfyUI workflows from one Python description, so the two formats never drift.

    python -m workflows.build_workflows          # from the pack's root; rewrites the files below; commit them

Outputs (UI format version 0.4 in workflows/, to drag into ComfyUI; API format for POST /prompt in workflows/api/,
used by tests/integration):
    thinkdiff_lvlm_in_context   ThinkDiff-LVLM: Qwen2-VL reasons over pictures + words, its tokens replace the prompt
    thinkdiff_clip_style        ThinkDiff-CLIP: one picture + text ("a dog" in the style of the picture)
    thinkdiff_clip_compose      ThinkDiff-CLIP: two pictures composed, plus a short text
    thinkdiff_three_modes       one VLM run rendered three ways: thinkdiff (aligned tokens), text (the VLM's words
                                through FLUX's own encoders), hybrid (aligned tokens, then the words' T5 tokens)
    thinkdiff_sd35_lvlm_in_context, thinkdiff_sd35_clip_compose, thinkdiff_chroma_lvlm_in_context,
    thinkdiff_chroma_clip_compose
                                the same aligners on SD3.5 Large and Chroma (cross-model transfer: the aligned tokens
                                take the place of those models' T5-XXL tokens)
    workflows/input/*.png       the example pictures, drawn in workflows/pictures.py (copy them into ComfyUI's input
                                folder)

ThinkDiff-LVLM (recipe sections 4, 5, 10): Qwen2-VL reads "red: <red car>, blue: <blue car>, green: ?", generates 128
tokens; their final-norm states go through the aligner into T5 space and replace FLUX.1-dev's prompt tokens; the
pooled vector is CLIP-L("") from an empty CLIPTextEncodeFlux; guidance 3.5, 28 euler steps, 1024x1024, seed 42.
ThinkDiff-CLIP (recipe sections 7, 10): BLIP-2's vision tower gives 65 tokens per picture, the CLIP aligner maps them
to T5 space, and they go *before* the text's T5 tokens, encoded at 128 tokens by T5TokenizerOptions (min_length 128)
as the recipe's diffusers pipeline did (ComfyUI pads T5 to 256 otherwise): 193 tokens for one picture, 258 for two;
pooled = CLIP-L of the text; same FLUX settings. On SD3.5 the aligned tokens follow its 77 CLIP-L/G tokens
(CLIPTextEncodeSD3 of "" or of the text); on Chroma they are the whole prompt (no pooled vector); both sample with
real CFG against an empty prompt.

`widgets_values` are positional, in the order of each node's INPUT_TYPES. For this pack's nodes the builder reads
that order, the defaults, the sockets and the outputs from the node classes themselves (nodes/, `pack_node`); a
workflow states only what it means to set (model file names, the recipe's values), and naming a widget the node does
not have is an error. ComfyUI's core nodes cannot be imported without ComfyUI, so their widgets are written out by
hand below, as ComfyUI's nodes.py defines them. The frontend stores an extra value after an INT with
control_after_generate (the seeds) and an "upload" value for LoadImage. Those UI-only values are marked `ui_only` and
left out of the API format; PreviewAny's read-only text box is the frontend's own, in neither format. A widget fed
by a link (the VLM's text into CLIPTextEncodeFlux) keeps its value in widgets_values and gets an input entry {"name",
"type", "widget": {"name"}, "link"} after the node's sockets, as the frontend saves it; the API format has [node, slot]
for it. `_meta.title` in the API format is the node's title, else its display name, as every frontend writes it.
tests/test_workflow_builder.py checks that the committed files are what this builder makes of the current node
classes; tests/integration/test_browser.py checks every file against what the real frontend makes of it.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

from nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from workflows.pictures import INPUT_IMAGES

WORKFLOWS_DIR = Path(__file__).resolve().parent
HF = "https://huggingface.co"
DEFAULT_WORKFLOW_ID = "6b1d3c52-7f0e-4c1a-9a51-7468696e6b64"


@dataclass
class Widget:
    name: str
    value: object
    ui_only: bool = False  # stored in the UI format only (control_after_generate, image upload)


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
    # Widgets fed by a link ("converted to an input"): (widget name, type), saved after the sockets.
    widget_sockets: list[tuple[str, str]] = field(default_factory=list)

    @property
    def inputs(self) -> list[tuple[str, str]]:
        return self.sockets + self.widget_sockets


@dataclass
class Link:
    id: int
    src: Node
    src_slot: int
    dst: Node
    dst_input: str

    @property
    def dst_slot(self) -> int:
        return [name for name, _ in self.dst.inputs].index(self.dst_input)

    @property
    def type(self) -> str:
        return self.src.outputs[self.src_slot][1]


@dataclass
class Workflow:
    name: str
    nodes: list[Node]
    links: list[Link]
    groups: list[dict] = field(default_factory=list)
    id: str = DEFAULT_WORKFLOW_ID  # fixed, so regenerating gives the same file

    def ui(self) -> dict:
        nodes = []
        for order, node in enumerate(self.nodes):
            properties = {"Node name for S&R": node.type} if not node.virtual else {}
            if node.models:
                properties["models"] = node.models
            inputs = []
            for name, kind in node.inputs:
                entry = {"name": name, "type": kind}
                if (name, kind) in node.widget_sockets:
                    entry["widget"] = {"name": name}
                entry["link"] = next(
                    (link.id for link in self.links if link.dst is node and link.dst_input == name), None
                )
                inputs.append(entry)
            entry = {
                "id": node.id,
                "type": node.type,
                "pos": list(node.pos),
                "size": list(node.size),
                "flags": {},
                "order": order,
                "mode": 0,
                "inputs": inputs,
                "outputs": [
                    {
                        "name": name,
                        "type": kind,
                        "links": [link.id for link in self.links if link.src is node and link.src_slot == slot],
                    }
                    for slot, (name, kind) in enumerate(node.outputs)
                ],
                "properties": properties,
                "widgets_values": [widget.value for widget in node.widgets],
            }
            if node.title:
                entry["title"] = node.title
            if node.color:
                entry["color"], entry["bgcolor"] = node.color, node.bgcolor
            nodes.append(entry)
        return {
            "id": self.id,
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
                "_meta": {"title": node.title or display_name(node.type)},
            }
        return prompt


# What every frontend (1.27.10, 1.49.6, 1.58.1) writes into the API prompt's `_meta.title` for a node without a title:
# its display name. For this pack's nodes that is NODE_DISPLAY_NAME_MAPPINGS; for the core nodes below, ComfyUI's own,
# the same in 0.3.64 and 0.33.0 (nodes.py NODE_DISPLAY_NAME_MAPPINGS; a V3 node without one shows its node id).
# Core nodes whose display name changed between those versions (DualCLIPLoader "DualCLIPLoader" -> "Load CLIP (Dual)",
# ConditioningZeroOut -> "Conditioning Zero Out", PreviewAny "Preview Any" -> "Preview as Text") are given an
# explicit title instead, so the API copy is what every supported ComfyUI and frontend emits.
CORE_DISPLAY_NAMES = {
    "KSampler": "KSampler",
    "UNETLoader": "Load Diffusion Model",
    "VAELoader": "Load VAE",
    "VAEDecode": "VAE Decode",
    "SaveImage": "Save Image",
    "LoadImage": "Load Image",
    "EmptySD3LatentImage": "EmptySD3LatentImage",
    "CheckpointLoaderSimple": "Load Checkpoint",
    "CLIPLoader": "Load CLIP",
    "CLIPTextEncode": "CLIP Text Encode (Prompt)",
    "ModelSamplingSD3": "ModelSamplingSD3",  # V1, no display name in either version
}


def display_name(node_type: str) -> str:
    if node_type in NODE_DISPLAY_NAME_MAPPINGS:
        return NODE_DISPLAY_NAME_MAPPINGS[node_type]
    if node_type in CORE_DISPLAY_NAMES:
        return CORE_DISPLAY_NAMES[node_type]
    raise WorkflowSpecError(
        f"{node_type} has no display name that is the same in every supported ComfyUI; give the node a title "
        f"(or add its display name to CORE_DISPLAY_NAMES)"
    )


def wire(wiring: list[tuple[Node, int, Node, str]]) -> list[Link]:
    """Links numbered from 1 in the order given: (source node, output slot, target node, input name)."""
    return [Link(index, src, slot, dst, name) for index, (src, slot, dst, name) in enumerate(wiring, start=1)]


class WorkflowSpecError(ValueError):
    """A workflow description that does not fit the node classes (an unknown widget, a missing value)."""


# --- ThinkDiff nodes: widgets, sockets and outputs read from the node classes ---------------------------------------

# ComfyUI's V1 API: an input whose type is a list of choices (a combo) or one of these types is a widget; any other type
# (THINKDIFF_VLM, IMAGE, CONDITIONING, ...) is a socket. `forceInput` makes a widget type a socket.
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
# Saved after every INT with control_after_generate (the seeds): fixed, so a workflow reproduces the recipe's picture.
CONTROL_AFTER_GENERATE = "fixed"


def input_specs(node_type: str) -> list[tuple[str, tuple]]:
    """(input name, type spec) of a pack node, in INPUT_TYPES order: required, then optional (hidden is never saved)."""
    input_types = NODE_CLASS_MAPPINGS[node_type].INPUT_TYPES()
    return [item for section in ("required", "optional") for item in input_types.get(section, {}).items()]


def spec_options(spec: tuple) -> dict:
    return spec[1] if len(spec) > 1 else {}


def is_widget(spec: tuple) -> bool:
    kind = spec[0]
    return (isinstance(kind, (list, tuple)) or kind in WIDGET_TYPES) and not spec_options(spec).get("forceInput")


def pack_widgets(node_type: str, values: dict[str, object]) -> list[Widget]:
    """The widgets of pack node `node_type` in INPUT_TYPES order, each with its value in `values` or else the node's
    default; a seed's control_after_generate follows it (UI only)."""
    specs = input_specs(node_type)
    widget_names = [name for name, spec in specs if is_widget(spec)]
    for name in values:
        if name not in widget_names:
            sockets = [socket for socket, spec in specs if not is_widget(spec)]
            kind = "a socket (fed by a link)" if name in sockets else "not an input"
            raise WorkflowSpecError(
                f"{node_type} has no widget '{name}' ({kind}); its widgets are {', '.join(widget_names)}. "
                f"Match the workflow to INPUT_TYPES in nodes/."
            )
    widgets = []
    for name, spec in specs:
        if not is_widget(spec):
            continue
        options = spec_options(spec)
        if name in values:
            value = values[name]
        elif "default" in options:
            value = options["default"]
        else:  # a combo of the user's model files: the workflow must name the file it was made for
            raise WorkflowSpecError(f"{node_type}.{name} has no default; state its value in the workflow")
        choices = spec[0]
        if isinstance(choices, (list, tuple)) and "default" in options and value not in choices:
            raise WorkflowSpecError(f"{node_type}.{name} = {value!r} is not one of its choices {list(choices)}")
        widgets.append(Widget(name, value))
        if options.get("control_after_generate"):
            widgets.append(Widget("control_after_generate", CONTROL_AFTER_GENERATE, ui_only=True))
    return widgets


def pack_node(
    id: int,
    node_type: str,
    pos: tuple[int, int],
    size: tuple[int, int],
    values: dict[str, object] | None = None,
    title: str | None = None,
    models: list[dict] | None = None,
) -> Node:
    """A ThinkDiff node whose widgets, sockets and outputs are those of its class; `values` are the widgets the
    workflow sets (every other widget keeps the node's default)."""
    node_class = NODE_CLASS_MAPPINGS[node_type]
    return Node(
        id,
        node_type,
        pos,
        size,
        pack_widgets(node_type, values or {}),
        sockets=[(name, spec[0]) for name, spec in input_specs(node_type) if not is_widget(spec)],
        outputs=list(zip(getattr(node_class, "RETURN_NAMES", node_class.RETURN_TYPES), node_class.RETURN_TYPES)),
        models=models or [],
        title=title,
    )


def aligner_loader(id: int, pos: tuple[int, int], name: str) -> Node:
    models = [{"name": name, "url": f"{HF}/Mifucius/ThinkDiff/resolve/main/{name}", "directory": "thinkdiff"}]
    return pack_node(id, "ThinkDiffAlignerLoader", pos, (340, 60), {"aligner": name}, models=models)


def vlm_loader(id: int, pos: tuple[int, int]) -> Node:
    # No properties.models here: the VLM is a folder, and the frontend compares hints with single files, so a hint
    # would always report it missing. The Read-me note gives the download command.
    return pack_node(id, "ThinkDiffVLMLoader", pos, (340, 230), {"model": "Qwen2-VL-7B-Instruct"})


def vlm_encode(id: int, pos: tuple[int, int]) -> Node:
    """The in-context example: image 1 goes with "red", image 2 with "blue", the query is "green"; 128 tokens (recipe
    section 4). These are stated even where the node's default agrees: they are what the workflow is about."""
    values = {"prompt": "red\nblue\ngreen", "layout": "in-context words", "num_tokens": 128}
    return pack_node(id, "ThinkDiffVLMEncode", pos, (340, 340), values)


VISION_ENCODER = "blip2_vision_tower.safetensors"  # made by `python -m thinkdiff_core extract-vision`; no public URL


def vision_loader(id: int, pos: tuple[int, int]) -> Node:
    # No properties.models: the extracted file is made locally (no URL to offer); the Read-me note says how.
    return pack_node(id, "ThinkDiffVisionLoader", pos, (340, 110), {"encoder": VISION_ENCODER})


def vision_encode(id: int, pos: tuple[int, int]) -> Node:
    return pack_node(id, "ThinkDiffVisionEncode", pos, (340, 170))


def thinkdiff_conditioning(
    id: int,
    pos: tuple[int, int],
    mode: str,
    text_tokens: int,
    title: str | None = None,
    size: tuple[int, int] = (340, 150),
    family: str | None = None,
) -> Node:
    values = {"mode": mode, "text_tokens": text_tokens}
    if family is not None:  # the FLUX workflows leave it at auto (read from the base)
        values["family"] = family
    return pack_node(id, "ThinkDiffConditioning", pos, size, values, title=title)


# --- ComfyUI core nodes: widgets written out by hand --------------------------------------------------------------
# ComfyUI is not importable here, so these restate its nodes' INPUT_TYPES (nodes.py, comfy_extras/): their names,
# order and UI-only extras are ComfyUI's contract. tests/integration/test_browser.py checks them in the real frontend.


def load_image(id: int, pos: tuple[int, int], image: str, title: str, size: tuple[int, int] = (220, 350)) -> Node:
    return Node(
        id,
        "LoadImage",
        pos,
        size,
        [Widget("image", image), Widget("upload", "image", ui_only=True)],
        outputs=[("IMAGE", "IMAGE"), ("MASK", "MASK")],
        title=title,
    )


def preview_any(id: int, pos: tuple[int, int]) -> Node:
    return Node(
        id,
        "PreviewAny",
        pos,
        (340, 240),
        # No widgets: its read-only text box `preview` is the frontend's, not an input of the node (INPUT_TYPES has
        # only `source` in 0.3.64 and 0.33.0). Frontend 1.27.10 still sends it in the prompt ("", ignored by the
        # server); 1.49.6 and 1.58.1 send neither it nor their `preview_mode` widget. The API copy sends what the
        # server reads, and tests/integration/test_browser.py drops 1.27.10's extra `preview` before comparing.
        [],
        sockets=[("source", "*")],
        title="VLM text",
    )


def dual_clip_loader(id: int, pos: tuple[int, int]) -> Node:
    return Node(
        id,
        "DualCLIPLoader",
        pos,
        (340, 130),
        [
            Widget("clip_name1", "clip_l.safetensors"),
            Widget("clip_name2", "t5xxl_fp16.safetensors"),
            Widget("type", "flux"),
            Widget("device", "default"),
        ],
        outputs=[("CLIP", "CLIP")],
        title="Load CLIP (Dual)",  # its display name since ComfyUI 0.33; 0.3.64 showed "DualCLIPLoader"
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


def text_encode_flux(
    id: int,
    pos: tuple[int, int],
    text: str,
    title: str,
    linked_text: bool = False,
    size: tuple[int, int] = (340, 170),
) -> Node:
    """CLIPTextEncodeFlux with `text` in both clip_l and t5xxl; linked_text: both widgets are fed by a STRING link."""
    return Node(
        id,
        "CLIPTextEncodeFlux",
        pos,
        size,
        [Widget("clip_l", text), Widget("t5xxl", text), Widget("guidance", 3.5)],
        sockets=[("clip", "CLIP")],
        outputs=[("CONDITIONING", "CONDITIONING")],
        title=title,
        widget_sockets=[("clip_l", "STRING"), ("t5xxl", "STRING")] if linked_text else [],
    )


def unet_loader(
    id: int,
    pos: tuple[int, int],
    name: str = "flux1-dev.safetensors",
    url: str = f"{HF}/black-forest-labs/FLUX.1-dev/resolve/main/flux1-dev.safetensors",
) -> Node:
    return Node(
        id,
        "UNETLoader",
        pos,
        (320, 90),
        [Widget("unet_name", name), Widget("weight_dtype", "default")],
        outputs=[("MODEL", "MODEL")],
        models=[{"name": name, "url": url, "directory": "diffusion_models"}],
    )


def t5_tokenizer_options(id: int, pos: tuple[int, int], min_length: int = 128, min_padding: int = 0) -> Node:
    """ComfyUI's T5TokenizerOptions (comfy_extras/nodes_cond.py, widgets min_padding then min_length in 0.3.64 and
    0.33.0): T5 text encoded at min_length tokens. 128 with no extra padding is the official ThinkDiff-CLIP encoding
    (diffusers pads T5 to 128, recipe section 10); ComfyUI's FLUX default is 256, SD3's 77."""
    return Node(
        id,
        "T5TokenizerOptions",
        pos,
        (320, 90),
        [Widget("min_padding", min_padding), Widget("min_length", min_length)],
        sockets=[("clip", "CLIP")],
        outputs=[("CLIP", "CLIP")],
        title=f"T5 Tokenizer Options ({min_length} tokens)",  # no display name in 0.3.64, "T5 Tokenizer Options" in 0.33
    )


SD35_LARGE = "sd3.5_large.safetensors"
SD35_REPO = f"{HF}/stabilityai/stable-diffusion-3.5-large/resolve/main"


def checkpoint_loader_sd35(id: int, pos: tuple[int, int]) -> Node:
    """CheckpointLoaderSimple with SD3.5 Large (MMDiT + VAE in one file; its text encoders come from
    TripleCLIPLoader), as ComfyUI's own SD3.5 example loads it."""
    return Node(
        id,
        "CheckpointLoaderSimple",
        pos,
        (320, 100),
        [Widget("ckpt_name", SD35_LARGE)],
        outputs=[("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")],
        models=[{"name": SD35_LARGE, "url": f"{SD35_REPO}/{SD35_LARGE}", "directory": "checkpoints"}],
    )


def triple_clip_loader(id: int, pos: tuple[int, int]) -> Node:
    """TripleCLIPLoader (comfy_extras/nodes_sd3.py): CLIP-L, CLIP-G, T5-XXL for SD3/SD3.5."""
    flux_encoders = f"{HF}/comfyanonymous/flux_text_encoders/resolve/main"
    return Node(
        id,
        "TripleCLIPLoader",
        pos,
        (340, 130),
        [
            Widget("clip_name1", "clip_l.safetensors"),
            Widget("clip_name2", "clip_g.safetensors"),
            Widget("clip_name3", "t5xxl_fp16.safetensors"),
        ],
        outputs=[("CLIP", "CLIP")],
        title="Load CLIP (Triple)",  # its display name since ComfyUI 0.33; 0.3.64 showed "TripleCLIPLoader"
        models=[
            {"name": "clip_l.safetensors", "url": f"{flux_encoders}/clip_l.safetensors", "directory": "text_encoders"},
            {
                "name": "clip_g.safetensors",
                "url": f"{SD35_REPO}/text_encoders/clip_g.safetensors",
                "directory": "text_encoders",
            },
            {
                "name": "t5xxl_fp16.safetensors",
                "url": f"{flux_encoders}/t5xxl_fp16.safetensors",
                "directory": "text_encoders",
            },
        ],
    )


def text_encode_sd3(
    id: int,
    pos: tuple[int, int],
    text: str,
    title: str,
    empty_padding: str = "none",
    size: tuple[int, int] = (340, 220),
) -> Node:
    """CLIPTextEncodeSD3 with `text` in clip_l, clip_g and t5xxl. empty_padding "none" (its default) drops the
    encoders of an empty box; "empty_prompt" encodes "" in each (77 CLIP-L/G tokens of "", T5("")), as diffusers'
    encode_prompt("") does: the empty-prompt base of the LVLM recipe."""
    return Node(
        id,
        "CLIPTextEncodeSD3",
        pos,
        size,
        [Widget("clip_l", text), Widget("clip_g", text), Widget("t5xxl", text), Widget("empty_padding", empty_padding)],
        sockets=[("clip", "CLIP")],
        outputs=[("CONDITIONING", "CONDITIONING")],
        title=title,
    )


def model_sampling_sd3(id: int, pos: tuple[int, int], shift: float = 3.0) -> Node:
    """ModelSamplingSD3 (comfy_extras/nodes_model_advanced.py): SD3's flow shift, 3.0 as its own workflows use."""
    return Node(
        id,
        "ModelSamplingSD3",
        pos,
        (320, 60),
        [Widget("shift", shift)],
        sockets=[("model", "MODEL")],
        outputs=[("MODEL", "MODEL")],
    )


CHROMA = "Chroma1-HD.safetensors"


def clip_loader_chroma(id: int, pos: tuple[int, int]) -> Node:
    """CLIPLoader with T5-XXL and type chroma (comfy/sd.py: the pixart_t5 encoder, no pooled vector)."""
    return Node(
        id,
        "CLIPLoader",
        pos,
        (340, 110),
        [Widget("clip_name", "t5xxl_fp16.safetensors"), Widget("type", "chroma"), Widget("device", "default")],
        outputs=[("CLIP", "CLIP")],
        models=[
            {
                "name": "t5xxl_fp16.safetensors",
                "url": f"{HF}/comfyanonymous/flux_text_encoders/resolve/main/t5xxl_fp16.safetensors",
                "directory": "text_encoders",
            }
        ],
    )


def text_encode(id: int, pos: tuple[int, int], text: str, title: str, size: tuple[int, int] = (340, 150)) -> Node:
    """CLIPTextEncode (nodes.py): one text for whatever encoder the CLIP holds (T5-XXL for Chroma)."""
    return Node(
        id,
        "CLIPTextEncode",
        pos,
        size,
        [Widget("text", text)],
        sockets=[("clip", "CLIP")],
        outputs=[("CONDITIONING", "CONDITIONING")],
        title=title,
    )


def zero_out(id: int, pos: tuple[int, int]) -> Node:
    return Node(
        id,
        "ConditioningZeroOut",
        pos,
        (320, 30),
        sockets=[("conditioning", "CONDITIONING")],
        outputs=[("CONDITIONING", "CONDITIONING")],
        title="Conditioning Zero Out",  # its display name since ComfyUI 0.33; 0.3.64 showed "ConditioningZeroOut"
    )


def empty_latent(id: int, pos: tuple[int, int]) -> Node:
    return Node(
        id,
        "EmptySD3LatentImage",
        pos,
        (320, 110),
        [Widget("width", 1024), Widget("height", 1024), Widget("batch_size", 1)],
        outputs=[("LATENT", "LATENT")],
    )


def ksampler(
    id: int,
    pos: tuple[int, int],
    title: str | None = None,
    steps: int = 28,
    cfg: float = 1.0,
    scheduler: str = "simple",
) -> Node:
    """Defaults: the recipe's FLUX.1-dev settings: seed 42, 28 euler steps, simple scheduler, cfg 1 (guidance is
    distilled). SD3.5 and Chroma sample with real classifier-free guidance (cfg > 1) against an empty prompt."""
    return Node(
        id,
        "KSampler",
        pos,
        (320, 270),
        [
            Widget("seed", 42),
            Widget("control_after_generate", "fixed", ui_only=True),
            Widget("steps", steps),
            Widget("cfg", cfg),
            Widget("sampler_name", "euler"),
            Widget("scheduler", scheduler),
            Widget("denoise", 1.0),
        ],
        sockets=[
            ("model", "MODEL"),
            ("positive", "CONDITIONING"),
            ("negative", "CONDITIONING"),
            ("latent_image", "LATENT"),
        ],
        outputs=[("LATENT", "LATENT")],
        title=title,
    )


def vae_loader(id: int, pos: tuple[int, int]) -> Node:
    return Node(
        id,
        "VAELoader",
        pos,
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


def vae_decode(id: int, pos: tuple[int, int], size: tuple[int, int] = (300, 50)) -> Node:
    return Node(
        id,
        "VAEDecode",
        pos,
        size,
        sockets=[("samples", "LATENT"), ("vae", "VAE")],
        outputs=[("IMAGE", "IMAGE")],
    )


def save_image(id: int, pos: tuple[int, int], prefix: str, size: tuple[int, int] = (420, 460)) -> Node:
    return Node(id, "SaveImage", pos, size, [Widget("filename_prefix", prefix)], sockets=[("images", "IMAGE")])


def note(id: int, text: str, size: tuple[int, int] = (460, 500)) -> Node:
    return Node(
        id, "MarkdownNote", (-500, 0), size, [Widget("text", text)], title="Read me: models and inputs", virtual=True
    )


def group(id: int, title: str, bounding: list[int], color: str) -> dict:
    return {"id": id, "title": title, "bounding": bounding, "color": color, "flags": {}}


FLUX_MODELS_TABLE = """| `flux1-dev.safetensors` | `models/diffusion_models/` | [black-forest-labs/FLUX.1-dev](https://huggingface.co/black-forest-labs/FLUX.1-dev) |
| `ae.safetensors` | `models/vae/` | same repository |
| `clip_l.safetensors`, `t5xxl_fp16.safetensors` | `models/text_encoders/` | [comfyanonymous/flux_text_encoders](https://huggingface.co/comfyanonymous/flux_text_encoders) |"""

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
    readme = note(1, NOTE)
    image_red = load_image(2, (-500, 540), "thinkdiff_red_car.png", "Load Image (word 1: red)")
    image_blue = load_image(3, (-260, 540), "thinkdiff_blue_car.png", "Load Image (word 2: blue)")
    vlm = vlm_loader(4, (0, 0))
    encode = vlm_encode(5, (0, 260))
    aligner = aligner_loader(6, (400, 0), "thinkdiff_lvlm.pth")
    clip = dual_clip_loader(7, (400, 110))
    empty_text = text_encode_flux(8, (400, 280), "", 'Empty prompt (CLIP-L "" pooled)')
    conditioning = thinkdiff_conditioning(9, (400, 490), "replace", 0)
    preview = preview_any(10, (400, 680))
    unet = unet_loader(11, (800, 0))
    negative = zero_out(12, (800, 130))
    latent = empty_latent(13, (800, 200))
    sampler = ksampler(14, (800, 350))
    vae = vae_loader(15, (1160, 0))
    decode = vae_decode(16, (1160, 110))
    save = save_image(17, (1160, 200), "ThinkDiff")
    nodes = [
        readme,
        image_red,
        image_blue,
        vlm,
        encode,
        aligner,
        clip,
        empty_text,
        conditioning,
        preview,
        unet,
        negative,
        latent,
        sampler,
        vae,
        decode,
        save,
    ]
    links = wire(
        [
            (vlm, 0, encode, "vlm"),
            (image_red, 0, encode, "image_1"),
            (image_blue, 0, encode, "image_2"),
            (clip, 0, empty_text, "clip"),
            (aligner, 0, conditioning, "aligner"),
            (encode, 0, conditioning, "features"),
            (empty_text, 0, conditioning, "conditioning"),
            (encode, 1, preview, "source"),
            (empty_text, 0, negative, "conditioning"),
            (unet, 0, sampler, "model"),
            (conditioning, 0, sampler, "positive"),
            (negative, 0, sampler, "negative"),
            (latent, 0, sampler, "latent_image"),
            (sampler, 0, decode, "samples"),
            (vae, 0, decode, "vae"),
            (decode, 0, save, "images"),
        ]
    )
    groups = [
        group(1, "ThinkDiff: VLM reasoning -> aligned T5-space tokens", [-20, -80, 780, 1000], "#3f789e"),
        group(2, "FLUX.1-dev", [780, -80, 820, 760], "#8A8"),
    ]
    return Workflow("thinkdiff_lvlm_in_context", nodes, links, groups)


# --- ThinkDiff-CLIP: pictures + text ---------------------------------------------------------------------------------

CLIP_MODELS = f"""**Models** (put them in these folders, then press `r`):

| file | folder | source |
|---|---|---|
| `{VISION_ENCODER}` | `models/clip_vision/` | made from [Salesforce/blip2-flan-t5-xxl](https://huggingface.co/Salesforce/blip2-flan-t5-xxl), see below |
| `thinkdiff_clip.pth` | `models/thinkdiff/` | [Mifucius/ThinkDiff](https://huggingface.co/Mifucius/ThinkDiff) |
{FLUX_MODELS_TABLE}

**The vision encoder** is the vision tower of BLIP-2 (EVA ViT-g, about 1 B parameters). BLIP-2 ships it inside its
whole checkpoint (with an 11 B flan-T5 that ThinkDiff-CLIP never uses), so there is no file to download on its own:
download the repository once and extract the tower (`hf` is huggingface_hub's CLI; run the second line in this
pack's folder with ComfyUI's Python), then the download may be deleted:

    hf download Salesforce/blip2-flan-t5-xxl --exclude "*.bin" --local-dir blip2-flan-t5-xxl
    python -m thinkdiff_core extract-vision blip2-flan-t5-xxl ComfyUI/models/clip_vision/{VISION_ENCODER}

Or put the whole `blip2-flan-t5-xxl/` folder in `models/clip_vision/` and pick it in the loader (only its vision
weights are read)."""

CLIP_STYLE_NOTE = f"""# ThinkDiff-CLIP: a picture + your text

**What it does.** BLIP-2's vision tower reads the picture: 1 CLS + 8x8 pooled patch tokens = **65 tokens**. The
**ThinkDiff-CLIP aligner** maps them into FLUX's T5 space, and *ThinkDiff Conditioning* (mode `prepend`) puts them
**before** the T5 tokens of your text, as in the paper. *T5 Tokenizer Options* (min_length 128) makes the text
encoder encode the text at 128 T5 tokens, as the paper did (ComfyUI's default is 256, and trimming that to 128 is
close but not the same): 65 + 128 = **193 tokens**. The pooled vector is CLIP-L of your text; guidance
3.5. Here: *a dog* in the style of the painting. Write the same text in both boxes of the text encoder. A smaller
`token_grid` (4x4, 2x2) lets the text weigh more; the aligner was trained on 8x8.

{CLIP_MODELS}

**Inputs.** Copy `workflows/input/*.png` of this pack into ComfyUI's `input/` folder, or load your own picture.
"""

CLIP_COMPOSE_NOTE = f"""# ThinkDiff-CLIP: two pictures composed

**What it does.** Both pictures go through BLIP-2's vision tower, 65 tokens each, in input order (image_1, then
image_2): **130 image tokens**. The **ThinkDiff-CLIP aligner** maps them into FLUX's T5 space and *ThinkDiff
Conditioning* (mode `prepend`) puts them before the T5 tokens of a short text, encoded at 128 tokens (*T5 Tokenizer
Options*, min_length 128, as the paper): 130 + 128 = **258 tokens**, the paper's two-image setting. FLUX draws one picture that combines both (here a
sunflower and a vase). The pooled vector is CLIP-L of the text; guidance 3.5.

{CLIP_MODELS}

**Inputs.** Copy `workflows/input/*.png` of this pack into ComfyUI's `input/` folder, or load your own pictures
(up to four: image_3, image_4).
"""


def clip_workflow(name: str, workflow_id: str, pictures: list[tuple[str, str]], text: str, note_text: str) -> Workflow:
    """ThinkDiff-CLIP: LoadImage(s) -> vision encode -> aligner -> prepend to the text's T5 tokens, encoded at 128
    (T5TokenizerOptions) -> FLUX."""
    readme = note(1, note_text, size=(460, 560))
    images = [
        load_image(2 + index, (-500 + 250 * index, 600), image, title, size=(230, 330))
        for index, (image, title) in enumerate(pictures)
    ]
    first = 2 + len(images)
    vision = vision_loader(first, (0, 0))
    encode = vision_encode(first + 1, (0, 150))
    aligner = aligner_loader(first + 2, (0, 360), "thinkdiff_clip.pth")
    clip = dual_clip_loader(first + 3, (400, 0))
    prompt = text_encode_flux(first + 4, (400, 270), text, "Text (after the picture tokens)")
    # The text at 128 T5 tokens, as the official inference encoded it (recipe section 10): encoded at 128, not
    # encoded at ComfyUI's 256 and trimmed (text_tokens 0 keeps all 128).
    conditioning = thinkdiff_conditioning(first + 5, (400, 470), "prepend", 0, title="ThinkDiff Conditioning (prepend)")
    unet = unet_loader(first + 6, (800, 0))
    negative = zero_out(first + 7, (800, 130))
    latent = empty_latent(first + 8, (800, 200))
    sampler = ksampler(first + 9, (800, 350))
    vae = vae_loader(first + 10, (1160, 0))
    decode = vae_decode(first + 11, (1160, 110))
    save = save_image(first + 12, (1160, 200), f"ThinkDiff-CLIP-{name.rsplit('_', 1)[1]}")
    options = t5_tokenizer_options(first + 13, (400, 140))
    wiring = [(vision, 0, encode, "vision")]
    wiring += [(image, 0, encode, f"image_{index}") for index, image in enumerate(images, start=1)]
    wiring += [
        (clip, 0, options, "clip"),
        (options, 0, prompt, "clip"),
        (aligner, 0, conditioning, "aligner"),
        (encode, 0, conditioning, "features"),
        (prompt, 0, conditioning, "conditioning"),
        (prompt, 0, negative, "conditioning"),
        (unet, 0, sampler, "model"),
        (conditioning, 0, sampler, "positive"),
        (negative, 0, sampler, "negative"),
        (latent, 0, sampler, "latent_image"),
        (sampler, 0, decode, "samples"),
        (vae, 0, decode, "vae"),
        (decode, 0, save, "images"),
    ]
    nodes = [readme, *images, vision, encode, aligner, clip, options, prompt, conditioning, unet, negative, latent]
    nodes += [sampler, vae, decode, save]
    groups = [
        group(
            1, "ThinkDiff-CLIP: picture tokens (BLIP-2 -> aligner), then text tokens", [-20, -80, 780, 720], "#3f789e"
        ),
        group(2, "FLUX.1-dev", [780, -80, 820, 760], "#8A8"),
    ]
    return Workflow(name, nodes, wire(wiring), groups, id=workflow_id)


def thinkdiff_clip_style() -> Workflow:
    return clip_workflow(
        "thinkdiff_clip_style",
        "6b1d3c52-7f0e-4c1a-9a51-7468696e6b65",
        [("thinkdiff_style_painting.png", "Load Image (style)")],
        "a dog",
        CLIP_STYLE_NOTE,
    )


def thinkdiff_clip_compose() -> Workflow:
    return clip_workflow(
        "thinkdiff_clip_compose",
        "6b1d3c52-7f0e-4c1a-9a51-7468696e6b66",
        [("thinkdiff_sunflower.png", "Load Image (image_1)"), ("thinkdiff_vase.png", "Load Image (image_2)")],
        "a photo",
        CLIP_COMPOSE_NOTE,
    )


# --- one VLM run, three ways to draw it ------------------------------------------------------------------------------

THREE_MODES_NOTE = f"""# ThinkDiff-LVLM: one VLM run, three renderings

Qwen2-VL reads the in-context example (*red* -> red car, *blue* -> blue car, *green* -> ?) **once**; FLUX draws its
answer three ways with the same seed, side by side:

- **(a) thinkdiff** (the paper): the 128 generated tokens' states through the aligner **replace** the prompt;
  the empty text encoder supplies CLIP-L("") pooled and guidance 3.5.
- **(b) text**: the VLM's generated *text* through FLUX's own CLIP-L and T5 (the text output is wired into both
  boxes of *CLIPTextEncodeFlux*): the usual "VLM writes the prompt" baseline.
- **(c) hybrid**: the aligned tokens **first**, then the T5 tokens of that text trimmed to 128 (`prepend`,
  `text_tokens` 128: ThinkDiff-CLIP's order); pooled = CLIP-L of the text.

The VLM generates exactly 128 tokens (the recipe), so its text may run on after the answer; the command-line
`--mode text` / `hybrid` stop at the answer's end instead. *VLM text* shows what it wrote.

**Models** (put them in these folders, then press `r`):

| file | folder | source |
|---|---|---|
| `Qwen2-VL-7B-Instruct/` (whole folder) | `models/LLM/` | [Qwen/Qwen2-VL-7B-Instruct](https://huggingface.co/Qwen/Qwen2-VL-7B-Instruct) |
| `thinkdiff_lvlm.pth` | `models/thinkdiff/` | [Mifucius/ThinkDiff](https://huggingface.co/Mifucius/ThinkDiff) |
{FLUX_MODELS_TABLE}

The VLM is a folder, not one file (`hf` is huggingface_hub's CLI; older versions call it `huggingface-cli`):
`hf download Qwen/Qwen2-VL-7B-Instruct --local-dir models/LLM/Qwen2-VL-7B-Instruct`

**Inputs.** Copy `workflows/input/*.png` of this pack into ComfyUI's `input/` folder.
"""


def thinkdiff_three_modes() -> Workflow:
    readme = note(1, THREE_MODES_NOTE, size=(460, 560))
    image_red = load_image(2, (-500, 600), "thinkdiff_red_car.png", "Load Image (word 1: red)")
    image_blue = load_image(3, (-260, 600), "thinkdiff_blue_car.png", "Load Image (word 2: blue)")
    vlm = vlm_loader(4, (0, 0))
    encode = vlm_encode(5, (0, 260))
    preview = preview_any(6, (0, 690))
    aligner = aligner_loader(7, (400, 0), "thinkdiff_lvlm.pth")
    clip = dual_clip_loader(8, (400, 110))
    empty_text = text_encode_flux(9, (400, 280), "", 'Empty prompt (CLIP-L "" pooled)')
    vlm_text = text_encode_flux(10, (400, 520), "", "VLM text as the prompt (b, c)", linked_text=True)
    replace = thinkdiff_conditioning(11, (800, 0), "replace", 0, title="(a) thinkdiff: aligned tokens only")
    hybrid = thinkdiff_conditioning(12, (800, 660), "prepend", 128, title="(c) hybrid: aligned tokens, then text")
    unet = unet_loader(13, (800, 200))
    negative = zero_out(14, (800, 330))
    latent = empty_latent(15, (800, 400))
    vae = vae_loader(16, (800, 560))
    samplers, decodes, saves = [], [], []
    for index, mode in enumerate(("thinkdiff", "text", "hybrid")):
        letter = "abc"[index]
        samplers.append(ksampler(17 + index, (1200, 330 * index), title=f"KSampler ({letter}) {mode}"))
        decodes.append(vae_decode(20 + index, (1560, 330 * index), size=(220, 50)))
        saves.append(save_image(23 + index, (1820, 330 * index), mode, size=(300, 300)))
    wiring = [
        (vlm, 0, encode, "vlm"),
        (image_red, 0, encode, "image_1"),
        (image_blue, 0, encode, "image_2"),
        (encode, 1, preview, "source"),
        (clip, 0, empty_text, "clip"),
        (clip, 0, vlm_text, "clip"),
        (encode, 1, vlm_text, "clip_l"),
        (encode, 1, vlm_text, "t5xxl"),
        (aligner, 0, replace, "aligner"),
        (encode, 0, replace, "features"),
        (empty_text, 0, replace, "conditioning"),
        (aligner, 0, hybrid, "aligner"),
        (encode, 0, hybrid, "features"),
        (vlm_text, 0, hybrid, "conditioning"),
        (empty_text, 0, negative, "conditioning"),
    ]
    for sampler, positive, decode, save in zip(samplers, (replace, vlm_text, hybrid), decodes, saves):
        wiring += [
            (unet, 0, sampler, "model"),
            (positive, 0, sampler, "positive"),
            (negative, 0, sampler, "negative"),
            (latent, 0, sampler, "latent_image"),
            (sampler, 0, decode, "samples"),
            (vae, 0, decode, "vae"),
            (decode, 0, save, "images"),
        ]
    nodes = [readme, image_red, image_blue, vlm, encode, preview, aligner, clip, empty_text, vlm_text, replace, hybrid]
    nodes += [unet, negative, latent, vae, *samplers, *decodes, *saves]
    groups = [
        group(1, "One VLM run (shared)", [-20, -80, 780, 1040], "#3f789e"),
        group(2, "FLUX.1-dev: (a) thinkdiff, (b) text, (c) hybrid; same seed", [780, -80, 1360, 1040], "#8A8"),
    ]
    return Workflow("thinkdiff_three_modes", nodes, wire(wiring), groups, id="6b1d3c52-7f0e-4c1a-9a51-7468696e6b67")


# --- the same aligners on SD3.5 Large and Chroma (cross-model transfer) --------------------------------------------


@dataclass
class OtherBase:
    """What a workflow for another T5-XXL base needs: its loaders, text encode, sampler settings and notes."""

    key: str  # sd35 | chroma
    label: str  # group title
    family: str  # ThinkDiffConditioning.family
    steps: int
    cfg: float
    scheduler: str
    models_table: str


SD35 = OtherBase(
    "sd35",
    "SD3.5 Large",
    "sd3",
    28,
    3.5,
    "sgm_uniform",
    f"""| `{SD35_LARGE}` | `models/checkpoints/` | [stabilityai/stable-diffusion-3.5-large](https://huggingface.co/stabilityai/stable-diffusion-3.5-large) (gated: accept the licence first) |
| `clip_g.safetensors` | `models/text_encoders/` | same repository, `text_encoders/` |
| `clip_l.safetensors`, `t5xxl_fp16.safetensors` | `models/text_encoders/` | [comfyanonymous/flux_text_encoders](https://huggingface.co/comfyanonymous/flux_text_encoders) |""",
)
CHROMA_BASE = OtherBase(
    "chroma",
    "Chroma",
    "chroma",
    40,
    3.0,
    "simple",
    f"""| `{CHROMA}` | `models/diffusion_models/` | [lodestones/Chroma1-HD](https://huggingface.co/lodestones/Chroma1-HD) |
| `ae.safetensors` | `models/vae/` | [black-forest-labs/FLUX.1-dev](https://huggingface.co/black-forest-labs/FLUX.1-dev) (FLUX.1's VAE) |
| `t5xxl_fp16.safetensors` | `models/text_encoders/` | [comfyanonymous/flux_text_encoders](https://huggingface.co/comfyanonymous/flux_text_encoders) |""",
)

TRANSFER_CAVEAT = """**Cross-model transfer.** The released aligners were trained against T5's decoder, so their tokens live in
T5-XXL encoder space (the paper's first mechanism) and should work wherever T5-XXL conditions the image model; the
paper only tested FLUX.1. How well they carry over to this model is what this workflow lets you see (CoBSAT numbers:
docs/cobsat.md, `--base`)."""


def other_base_nodes(base: OtherBase, first: int, x: int) -> dict:
    """The base's nodes, ids from `first`: clip loader, model (+ sampling), VAE source, an empty-prompt encode."""
    if base.key == "sd35":
        clip = triple_clip_loader(first, (400, 0))
        checkpoint = checkpoint_loader_sd35(first + 1, (x, 0))
        sampling = model_sampling_sd3(first + 2, (x, 130))
        empty = text_encode_sd3(
            first + 3, (400, 600), "", 'Empty prompt (CLIP-L/G "" tokens and pooled)', empty_padding="empty_prompt"
        )
        return {
            "clip": clip,
            "nodes": [clip, checkpoint, sampling, empty],
            "wiring": [(checkpoint, 0, sampling, "model"), (clip, 0, empty, "clip")],
            "model": (sampling, 0),
            "vae": (checkpoint, 2),
            "empty": empty,
            "encode": lambda id, pos, text, title: text_encode_sd3(id, pos, text, title),
        }
    clip = clip_loader_chroma(first, (400, 0))
    unet = unet_loader(first + 1, (x, 0), CHROMA, f"{HF}/lodestones/Chroma1-HD/resolve/main/{CHROMA}")
    vae = vae_loader(first + 2, (x, 130))
    empty = text_encode(first + 3, (400, 600), "", 'Empty prompt ("" for CFG)')
    return {
        "clip": clip,
        "nodes": [clip, unet, vae, empty],
        "wiring": [(clip, 0, empty, "clip")],
        "model": (unet, 0),
        "vae": (vae, 0),
        "empty": empty,
        "encode": lambda id, pos, text, title: text_encode(id, pos, text, title),
    }


def sampling_tail(base: OtherBase, first: int, x: int, parts: dict, positive: Node, prefix: str) -> tuple[list, list]:
    """Latent, KSampler (real CFG against the empty prompt), decode, save; ids from `first`."""
    latent = empty_latent(first, (x, 260))
    sampler = ksampler(first + 1, (x, 410), steps=base.steps, cfg=base.cfg, scheduler=base.scheduler)
    decode = vae_decode(first + 2, (x + 360, 0))
    save = save_image(first + 3, (x + 360, 90), prefix)
    model, model_slot = parts["model"]
    vae, vae_slot = parts["vae"]
    wiring = [
        (model, model_slot, sampler, "model"),
        (positive, 0, sampler, "positive"),
        (parts["empty"], 0, sampler, "negative"),
        (latent, 0, sampler, "latent_image"),
        (sampler, 0, decode, "samples"),
        (vae, vae_slot, decode, "vae"),
        (decode, 0, save, "images"),
    ]
    return [latent, sampler, decode, save], wiring


def other_lvlm_note(base: OtherBase) -> str:
    pooled = (
        "its CLIP-L/G tokens of the empty prompt stay in front of the aligned tokens, with their pooled vector"
        if base.family == "sd3"
        else "Chroma has no pooled vector, so the aligned tokens are the whole prompt"
    )
    return f"""# ThinkDiff-LVLM on {base.label}: in-context reasoning, then drawing

**What it does.** As *thinkdiff_lvlm_in_context*, with {base.label} drawing: Qwen2-VL reads the two pictures with
their words (*red* -> red car, *blue* -> blue car) and the query *green*, and generates 128 tokens; the **ThinkDiff
aligner** maps their states into T5-XXL space and they **replace** {base.label}'s T5 tokens (mode `replace`, family
`{base.family}`): {pooled}. {base.label} samples with CFG {base.cfg} against the empty prompt.

{TRANSFER_CAVEAT}

**Models** (put them in these folders, then press `r`):

| file | folder | source |
|---|---|---|
| `Qwen2-VL-7B-Instruct/` (whole folder) | `models/LLM/` | [Qwen/Qwen2-VL-7B-Instruct](https://huggingface.co/Qwen/Qwen2-VL-7B-Instruct) |
| `thinkdiff_lvlm.pth` | `models/thinkdiff/` | [Mifucius/ThinkDiff](https://huggingface.co/Mifucius/ThinkDiff) |
{base.models_table}

The VLM is a folder: `hf download Qwen/Qwen2-VL-7B-Instruct --local-dir models/LLM/Qwen2-VL-7B-Instruct`

**Inputs.** Copy `workflows/input/*.png` of this pack into ComfyUI's `input/` folder.
"""


def other_clip_note(base: OtherBase) -> str:
    front = "after SD3.5's 77 CLIP-L/G tokens of the text" if base.family == "sd3" else "as Chroma's whole prompt"
    models = CLIP_MODELS.replace(FLUX_MODELS_TABLE, base.models_table)
    return f"""# ThinkDiff-CLIP on {base.label}: two pictures composed

**What it does.** As *thinkdiff_clip_compose*, with {base.label} drawing: 65 BLIP-2 tokens per picture (130), mapped
by the **ThinkDiff-CLIP aligner** into T5-XXL space, then (mode `prepend`, family `{base.family}`) the T5 tokens of
the text encoded at 128 (*T5 Tokenizer Options*, min_length 128, as the paper), {front}. {base.label} samples with
CFG {base.cfg} against the empty prompt.

{TRANSFER_CAVEAT}

{models}

**Inputs.** Copy `workflows/input/*.png` of this pack into ComfyUI's `input/` folder, or load your own pictures.
"""


def other_lvlm_workflow(base: OtherBase, workflow_id: str) -> Workflow:
    readme = note(1, other_lvlm_note(base), size=(460, 620))
    image_red = load_image(2, (-500, 660), "thinkdiff_red_car.png", "Load Image (word 1: red)")
    image_blue = load_image(3, (-260, 660), "thinkdiff_blue_car.png", "Load Image (word 2: blue)")
    vlm = vlm_loader(4, (0, 0))
    encode = vlm_encode(5, (0, 260))
    aligner = aligner_loader(6, (400, 160), "thinkdiff_lvlm.pth")
    conditioning = thinkdiff_conditioning(7, (400, 280), "replace", 0, family=base.family)
    preview = preview_any(8, (0, 640))
    parts = other_base_nodes(base, 9, 800)
    tail, tail_wiring = sampling_tail(base, 13, 800, parts, conditioning, f"ThinkDiff-{base.key}")
    wiring = [
        (vlm, 0, encode, "vlm"),
        (image_red, 0, encode, "image_1"),
        (image_blue, 0, encode, "image_2"),
        (encode, 1, preview, "source"),
        *parts["wiring"],
        (aligner, 0, conditioning, "aligner"),
        (encode, 0, conditioning, "features"),
        (parts["empty"], 0, conditioning, "conditioning"),
        *tail_wiring,
    ]
    nodes = [readme, image_red, image_blue, vlm, encode, aligner, conditioning, preview, *parts["nodes"], *tail]
    groups = [
        group(1, "ThinkDiff: VLM reasoning -> aligned T5-space tokens", [-20, -80, 780, 1000], "#3f789e"),
        group(2, base.label, [780, -80, 820, 760], "#8A8"),
    ]
    return Workflow(f"thinkdiff_{base.key}_lvlm_in_context", nodes, wire(wiring), groups, id=workflow_id)


def other_clip_workflow(base: OtherBase, workflow_id: str) -> Workflow:
    readme = note(1, other_clip_note(base), size=(460, 620))
    pictures = [("thinkdiff_sunflower.png", "Load Image (image_1)"), ("thinkdiff_vase.png", "Load Image (image_2)")]
    images = [
        load_image(2 + index, (-500 + 250 * index, 660), image, title, size=(230, 330))
        for index, (image, title) in enumerate(pictures)
    ]
    vision = vision_loader(4, (0, 0))
    encode = vision_encode(5, (0, 150))
    aligner = aligner_loader(6, (0, 360), "thinkdiff_clip.pth")
    parts = other_base_nodes(base, 7, 800)
    options = t5_tokenizer_options(11, (400, 140))
    prompt = parts["encode"](12, (400, 260), "a photo", "Text (after the picture tokens)")
    conditioning = thinkdiff_conditioning(
        13, (400, 760), "prepend", 0, title="ThinkDiff Conditioning (prepend)", family=base.family
    )
    tail, tail_wiring = sampling_tail(base, 14, 800, parts, conditioning, f"ThinkDiff-CLIP-{base.key}")
    wiring = [(vision, 0, encode, "vision")]
    wiring += [(image, 0, encode, f"image_{index}") for index, image in enumerate(images, start=1)]
    wiring += [
        *parts["wiring"],
        (parts["clip"], 0, options, "clip"),
        (options, 0, prompt, "clip"),
        (aligner, 0, conditioning, "aligner"),
        (encode, 0, conditioning, "features"),
        (prompt, 0, conditioning, "conditioning"),
        *tail_wiring,
    ]
    nodes = [readme, *images, vision, encode, aligner, *parts["nodes"], options, prompt, conditioning, *tail]
    groups = [
        group(
            1, "ThinkDiff-CLIP: picture tokens (BLIP-2 -> aligner), then text tokens", [-20, -80, 780, 1000], "#3f789e"
        ),
        group(2, base.label, [780, -80, 820, 760], "#8A8"),
    ]
    return Workflow(f"thinkdiff_{base.key}_clip_compose", nodes, wire(wiring), groups, id=workflow_id)


def thinkdiff_sd35_lvlm_in_context() -> Workflow:
    return other_lvlm_workflow(SD35, "6b1d3c52-7f0e-4c1a-9a51-7468696e6b68")


def thinkdiff_sd35_clip_compose() -> Workflow:
    return other_clip_workflow(SD35, "6b1d3c52-7f0e-4c1a-9a51-7468696e6b69")


def thinkdiff_chroma_lvlm_in_context() -> Workflow:
    return other_lvlm_workflow(CHROMA_BASE, "6b1d3c52-7f0e-4c1a-9a51-7468696e6b6a")


def thinkdiff_chroma_clip_compose() -> Workflow:
    return other_clip_workflow(CHROMA_BASE, "6b1d3c52-7f0e-4c1a-9a51-7468696e6b6b")


WORKFLOWS = [
    thinkdiff_lvlm_in_context,
    thinkdiff_clip_style,
    thinkdiff_clip_compose,
    thinkdiff_three_modes,
    thinkdiff_sd35_lvlm_in_context,
    thinkdiff_sd35_clip_compose,
    thinkdiff_chroma_lvlm_in_context,
    thinkdiff_chroma_clip_compose,
]


def workflow_files() -> dict[str, str]:
    """The text of every workflow file, keyed by its path under workflows/: {name}.json and api/{name}.api.json."""
    files = {}
    for build in WORKFLOWS:
        workflow = build()
        files[f"{workflow.name}.json"] = json.dumps(workflow.ui(), indent=2, ensure_ascii=False) + "\n"
        files[f"api/{workflow.name}.api.json"] = json.dumps(workflow.api(), indent=2, ensure_ascii=False) + "\n"
    return files


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(
        prog="python -m workflows.build_workflows",
        description="Rewrite workflows/*.json, workflows/api/*.api.json and workflows/input/*.png from this file and "
        "the node classes (commit the result).",
    ).parse_args(argv)
    (WORKFLOWS_DIR / "api").mkdir(exist_ok=True)
    (WORKFLOWS_DIR / "input").mkdir(exist_ok=True)
    for relative, text in workflow_files().items():
        path = WORKFLOWS_DIR / relative
        path.write_text(text)
        print(f"wrote {path.relative_to(WORKFLOWS_DIR.parent)}")
    for name, draw in INPUT_IMAGES.items():
        path = WORKFLOWS_DIR / "input" / name
        draw().save(path, optimize=True)
        print(f"wrote {path.relative_to(WORKFLOWS_DIR.parent)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
