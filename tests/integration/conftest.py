"""Shared helpers for the opt-in tests against a real ComfyUI: stand-in models, a ComfyUI home folder, the server.

Opt-in: these tests run only when COMFYUI_PATH points at a ComfyUI checkout (verified: 0.3.64, commit a125cd84, and
0.33.0, commit 783545f6);
`scripts/comfyui_integration.sh` installs what they need and runs them. Without COMFYUI_PATH every test here is
skipped at collection, and this module imports only the standard library, so the default run stays fast.

ComfyUI runs in a subprocess with COMFYUI_PYTHON (default: this interpreter). Its python needs ComfyUI's
requirements plus this pack's; the tests talk to it over HTTP only (stdlib urllib).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from .comfy_standins import FILES as STANDIN_FILES

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS_DIR = REPO_ROOT / "workflows"
PACK_LINK_NAME = "ComfyUI-ThinkDiff"
COMFYUI_PATH = os.environ.get("COMFYUI_PATH", "")
STANDIN_VERSION = "v3"  # bump when a stand-in builder changes, so cached files are rebuilt
# The ComfyUI sources the stand-in builder (comfy_standins.py) runs: their hash is part of the cache key, so stand-ins
# built by one ComfyUI are never used by another.
STANDIN_SOURCES = (
    "comfyui_version.py",
    "comfy/model_detection.py",
    "comfy/ldm/flux/model.py",
    "comfy/ldm/flux/layers.py",
    "comfy/ldm/modules/diffusionmodules/mmdit.py",
    "comfy/ldm/chroma/model.py",
    "comfy/ldm/chroma/layers.py",
    "comfy/ldm/models/autoencoder.py",
    "comfy/ldm/modules/diffusionmodules/model.py",
    "comfy/sd1_clip.py",
    "comfy/sd1_clip_config.json",
    "comfy/clip_model.py",
    "comfy/ops.py",
)

# Stand-in file names. The loaders' widget values in the test copies of the workflows point at these.
TINY_VLM = "tiny-qwen2-vl-STANDIN"
TINY_VLM_HIDDEN = 64
TINY_ALIGNER = "tiny-lvlm-aligner-STANDIN.safetensors"
TINY_VISION = "tiny-blip2-vision-STANDIN"  # a tiny BLIP-2 vision tower (hidden 48), extracted to a single file
TINY_VISION_HIDDEN = 48
TINY_CLIP_ALIGNER = "tiny-clip-aligner-STANDIN.safetensors"
VISION_ENCODER_NAME = "blip2_vision_tower.safetensors"  # the ThinkDiff-CLIP workflows' encoder name
COMFY_STANDINS = STANDIN_FILES  # built by comfy_standins.py
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
BROWSER_DIR = Path(__file__).resolve().parent / "browser"


def comfyui_available() -> bool:
    return bool(COMFYUI_PATH) and (Path(COMFYUI_PATH) / "main.py").is_file()


def browser_missing() -> str | None:
    """Why the browser test cannot run here, or None."""
    if not Path(CHROMIUM).is_file():
        return f"{CHROMIUM} not found (Debian: apt-get install chromium)"
    if shutil.which("node") is None:
        return "node not found"
    if not (BROWSER_DIR / "node_modules" / "playwright-core").is_dir():
        return f"playwright-core not installed: run `npm ci` in {BROWSER_DIR.relative_to(REPO_ROOT)}"
    return None


def pytest_collection_modifyitems(config, items):
    """Skip the opt-in tests cleanly (no ComfyUI import, no model builds) when their requirements are absent."""
    no_comfyui = pytest.mark.skip(
        reason="set COMFYUI_PATH to a ComfyUI checkout (e.g. 0.3.64) to run the real-ComfyUI tests"
    )
    for item in items:
        if ("comfyui" in item.keywords or "browser" in item.keywords) and not comfyui_available():
            item.add_marker(no_comfyui)
        elif "browser" in item.keywords and browser_missing():
            item.add_marker(pytest.mark.skip(reason=browser_missing()))


def comfyui_version() -> str:
    """ComfyUI's version (comfyui_version.py), with its git commit where COMFYUI_PATH is a git checkout."""
    text = (Path(COMFYUI_PATH) / "comfyui_version.py").read_text() if COMFYUI_PATH else ""
    version = next((line.split("=")[1].strip().strip("\"'") for line in text.splitlines() if "__version__" in line), "")
    commit = ""
    if (Path(COMFYUI_PATH) / ".git").exists():
        git = ["git", "-C", COMFYUI_PATH, "rev-parse", "--short=8", "HEAD"]
        commit = subprocess.run(git, capture_output=True, text=True).stdout.strip()
    return "-".join(filter(None, [version or "unknown", commit]))


def standin_cache_key() -> str:
    """<builder version>-comfyui-<version>[-<commit>]-<hash of the ComfyUI sources the builder runs>."""
    import hashlib

    digest = hashlib.sha256()
    for name in STANDIN_SOURCES:
        path = Path(COMFYUI_PATH) / name
        digest.update(name.encode() + b"\0" + (path.read_bytes() if path.is_file() else b"absent") + b"\0")
    return f"{STANDIN_VERSION}-comfyui-{comfyui_version()}-{digest.hexdigest()[:12]}"


def comfyui_python() -> str:
    return os.environ.get("COMFYUI_PYTHON") or sys.executable


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- stand-in models -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def standin_dir(request, tmp_path_factory) -> Path:
    """Cached stand-ins: FLUX/VAE/CLIP-L, an SD3.5 checkpoint and Chroma built by ComfyUI's own classes
    (comfy_standins.py, in a subprocess with ComfyUI's python), the tiny Qwen2-VL folder and a matching aligner, a
    tiny BLIP-2 vision tower extracted to one file and a matching ThinkDiff-CLIP aligner. Reused across runs via
    pytest's cache (override with THINKDIFF_STANDIN_CACHE), in a folder named by standin_cache_key(): one per ComfyUI
    version and builder."""
    if os.environ.get("THINKDIFF_STANDIN_CACHE"):
        base = Path(os.environ["THINKDIFF_STANDIN_CACHE"])
    elif getattr(request.config, "cache", None) is not None:  # absent under -p no:cacheprovider
        base = Path(request.config.cache.mkdir("thinkdiff_comfyui_standins"))
    else:
        base = tmp_path_factory.mktemp("standins")
    out = base / standin_cache_key()
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if not all((out / name).exists() for name in COMFY_STANDINS.values()):
        subprocess.run(
            [comfyui_python(), str(Path(__file__).with_name("comfy_standins.py")), COMFYUI_PATH, str(out)],
            check=True,
            cwd=REPO_ROOT,
            env={
                **os.environ,
                "PYTHONPATH": os.pathsep.join(filter(None, [COMFYUI_PATH, os.environ.get("PYTHONPATH")])),
            },
            timeout=600,
        )
    from thinkdiff_core import save_aligner, standin

    if not (out / TINY_VLM / "config.json").exists():
        standin.build_qwen2vl(out / f"{TINY_VLM}.tmp")
        (out / f"{TINY_VLM}.tmp").rename(out / TINY_VLM)
    if not (out / TINY_ALIGNER).exists():
        save_aligner(
            standin.build_aligner(input_dim=TINY_VLM_HIDDEN, output_dim=4096, source_model=TINY_VLM), out / TINY_ALIGNER
        )
    if not (out / f"{TINY_VISION}.safetensors").exists():
        make_vision_tower_file(out / f"{TINY_VISION}.safetensors")
    if not (out / TINY_CLIP_ALIGNER).exists():
        save_aligner(build_clip_aligner(TINY_VISION_HIDDEN, TINY_VISION), out / TINY_CLIP_ALIGNER)
    print(f"[standins] ready in {time.perf_counter() - started:.1f} s at {out}")
    return out


def make_vision_tower_file(path: Path, hidden_size: int = TINY_VISION_HIDDEN) -> Path:
    """A tiny BLIP-2 vision tower as a single file, written the way users make the real one
    (`python -m thinkdiff_core extract-vision`), so the vision loader lists and loads it."""
    import tempfile

    from thinkdiff_core import standin
    from thinkdiff_core.vision import extract_vision_tower

    with tempfile.TemporaryDirectory() as folder:
        tower = standin.build_blip2_vision(Path(folder) / TINY_VISION, hidden_size=hidden_size)
        return extract_vision_tower(tower, path)


def build_clip_aligner(input_dim: int, source_model: str, seed: int = 0):
    """A random ThinkDiff-CLIP aligner (variant "clip") input_dim -> 4096."""
    import torch

    from thinkdiff_core import AlignerSpec, ThinkDiffAligner

    torch.manual_seed(seed)
    return ThinkDiffAligner(AlignerSpec("clip", input_dim, 4096, source_model=source_model))


# --- a ComfyUI home folder ------------------------------------------------------------------------------------------


@dataclass
class ComfyHome:
    """Folders one test server uses; models go under models/<ComfyUI folder key>/."""

    root: Path

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def input(self) -> Path:
        return self.root / "input"

    @property
    def output(self) -> Path:
        return self.root / "output"

    @property
    def user(self) -> Path:
        return self.root / "user"

    @property
    def yaml(self) -> Path:
        return self.root / "extra_model_paths.yaml"

    def add_model(self, folder: str, name: str, source: Path | None = None) -> Path:
        """Link `source` (file or folder) into models/<folder>/<name>; without a source, an empty placeholder file."""
        target = self.models / folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source is None:
            target.touch()
        elif source.is_dir():
            shutil.copytree(source, target, dirs_exist_ok=True)  # small folders only (the tiny VLM)
        else:
            target.symlink_to(source)
        return target


MODEL_FOLDERS = ("checkpoints", "diffusion_models", "text_encoders", "vae", "clip_vision", "LLM", "thinkdiff")


def make_home(root: Path) -> ComfyHome:
    """An isolated ComfyUI home: this pack linked as a custom node, model folders, input images, user settings."""
    home = ComfyHome(root)
    for folder in (home.input, home.output, home.user / "default", home.root / "custom_nodes"):
        folder.mkdir(parents=True, exist_ok=True)
    for key in MODEL_FOLDERS:
        (home.models / key).mkdir(parents=True, exist_ok=True)
    (home.root / "custom_nodes" / PACK_LINK_NAME).symlink_to(REPO_ROOT, target_is_directory=True)
    for picture in (WORKFLOWS_DIR / "input").glob("*.png"):
        shutil.copy(picture, home.input / picture.name)
    lines = ["thinkdiff_tests:", f"    base_path: {home.root}", "    custom_nodes: custom_nodes"]
    lines += [f"    {key}: models/{key}" for key in MODEL_FOLDERS]
    home.yaml.write_text("\n".join(lines) + "\n")
    # Frontend settings: no first-run templates dialog; no minimap, canvas menu or render stats in screenshots.
    settings = {
        "Comfy.TutorialCompleted": True,
        "Comfy.Minimap.Visible": False,
        "Comfy.Graph.CanvasMenu": False,
        "Comfy.Graph.CanvasInfo": False,
    }
    (home.user / "default" / "comfy.settings.json").write_text(json.dumps(settings))
    return home


TEST_NODES = '''"""Test-only ComfyUI nodes, written by tests/integration/conftest.py into a test server's custom_nodes (never shipped)."""

import torch


class ThinkDiffTestT5Width:
    """Stands in for T5-XXL's width: pads a (batch, tokens, 768) CLIP-L conditioning with zero features to 4096 and
    with zero tokens to at least 256 (ComfyUI's FLUX T5 padding); pooled output and guidance are kept."""

    CATEGORY = "ThinkDiff/tests"
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "widen"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"conditioning": ("CONDITIONING",)}}

    def widen(self, conditioning):
        out = []
        for cond, options in conditioning:
            wide = torch.nn.functional.pad(cond, (0, 4096 - cond.shape[-1]))
            wide = torch.nn.functional.pad(wide, (0, 0, 0, max(0, 256 - wide.shape[1])))
            out.append([wide, dict(options)])
        return (out,)


def t5_like(cond):
    """(batch, tokens, 768) CLIP-L states tiled to 4096 features, offset so that no feature is exactly zero."""
    repeats = -(-4096 // cond.shape[-1])
    return cond.repeat(1, 1, repeats)[..., :4096] + 1e-3


class ThinkDiffTestT5Only:
    """Stands in for a T5-XXL-only encoder (Chroma's CLIPLoader type "chroma", pixart_t5): a (batch, tokens, 768)
    CLIP-L conditioning tiled to 4096 features (t5_like: nonzero everywhere, as T5 states are) and pooled_output
    None, as ComfyUI's T5-only encoders give; the token count is kept."""

    CATEGORY = "ThinkDiff/tests"
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "t5_only"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"conditioning": ("CONDITIONING",)}}

    def t5_only(self, conditioning):
        out = []
        for cond, options in conditioning:
            out.append([t5_like(cond), {**options, "pooled_output": None}])
        return (out,)


class ThinkDiffTestSD3Layout:
    """Stands in for SD3's TripleCLIPLoader + CLIPTextEncodeSD3 from a (batch, 77, 768) CLIP-L conditioning, in
    ComfyUI's SD3 layout (comfy/text_encoders/sd3_clip.py): the CLIP block is CLIP-L's 77 tokens with CLIP-G's 1280
    features zero (as ComfyUI does without CLIP-G) and zero-padded to 4096; then as many T5 tokens, the CLIP-L states
    tiled to 4096 features (nonzero past column 2048, as T5 states are); pooled_output CLIP-L's 768 ++ 1280 zeros."""

    CATEGORY = "ThinkDiff/tests"
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "sd3_layout"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"conditioning": ("CONDITIONING",)}}

    def sd3_layout(self, conditioning):
        out = []
        for cond, options in conditioning:
            clip_block = torch.nn.functional.pad(cond, (0, 4096 - cond.shape[-1]))
            t5_block = t5_like(cond)
            pooled = options["pooled_output"]
            pooled = torch.nn.functional.pad(pooled, (0, 2048 - pooled.shape[-1]))
            out.append([torch.cat([clip_block, t5_block], dim=1), {**options, "pooled_output": pooled}])
        return (out,)


class ThinkDiffTestConditioningProbe:
    """Reports the layout of a CONDITIONING (the same object the sampler gets) in the prompt's /history outputs: token
    count, width, leading 77-token chunks whose columns past 2048 are zero (SD3's CLIP block), pooled shape."""

    CATEGORY = "ThinkDiff/tests"
    RETURN_TYPES = ()
    FUNCTION = "probe"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"conditioning": ("CONDITIONING",)}}

    def probe(self, conditioning):
        import json

        layouts = []
        for cond, options in conditioning:
            zero_tail = (cond[..., 2048:] == 0).all(dim=-1).all(dim=0).long() if cond.shape[-1] > 2048 else None
            clip_tokens = 0 if zero_tail is None else int(zero_tail.cumprod(dim=0).sum()) // 77 * 77
            pooled = options.get("pooled_output")
            layouts.append(
                {
                    "shape": list(cond.shape),
                    "clip_tokens": clip_tokens,
                    "pooled": None if pooled is None else list(pooled.shape),
                    "finite": bool(torch.isfinite(cond).all()),
                }
            )
        return {"ui": {"layout": [json.dumps(layouts)]}}


NODE_CLASS_MAPPINGS = {
    "ThinkDiffTestT5Width": ThinkDiffTestT5Width,
    "ThinkDiffTestT5Only": ThinkDiffTestT5Only,
    "ThinkDiffTestSD3Layout": ThinkDiffTestSD3Layout,
    "ThinkDiffTestConditioningProbe": ThinkDiffTestConditioningProbe,
}
'''


def install_test_nodes(home: ComfyHome) -> None:
    """Adds the test-only nodes above (ThinkDiffTestT5Width, ThinkDiffTestT5Only, ThinkDiffTestSD3Layout,
    ThinkDiffTestConditioningProbe) to the home's custom_nodes."""
    package = home.root / "custom_nodes" / "thinkdiff_test_nodes"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text(TEST_NODES)


# --- the server -----------------------------------------------------------------------------------------------------


class ComfyServer:
    """A headless ComfyUI subprocess and a small HTTP client for it."""

    def __init__(self, home: ComfyHome, front_end_root: Path | None = None, startup_timeout: float = 180.0) -> None:
        self.home = home
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = home.root / f"comfyui-{self.port}.log"
        command = [
            comfyui_python(),
            str(Path(COMFYUI_PATH) / "main.py"),
            "--cpu",
            "--listen",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--extra-model-paths-config",
            str(home.yaml),
            "--output-directory",
            str(home.output),
            "--input-directory",
            str(home.input),
            "--user-directory",
            str(home.user),
            "--database-url",
            f"sqlite:///{home.root / 'db.sqlite'}",
            "--disable-auto-launch",
        ]
        if front_end_root is not None:
            command += ["--front-end-root", str(front_end_root)]
        env = dict(
            os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", PYTHONUNBUFFERED="1"
        )
        self._log = self.log_path.open("wb")
        self.started = time.perf_counter()
        self.process = subprocess.Popen(command, cwd=home.root, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        self._wait_ready(startup_timeout)
        self.startup_seconds = time.perf_counter() - self.started

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.process.returncode} during start-up:\n{self.log_tail()}")
            with contextlib.suppress(OSError, urllib.error.URLError):
                if self.get("/system_stats") is not None:
                    return
            time.sleep(0.5)
        raise TimeoutError(f"ComfyUI did not answer within {timeout:.0f} s:\n{self.log_tail()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def request(self, method: str, path: str, body: dict | None = None, timeout: float = 30.0) -> tuple[int, object]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            self.url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as error:
            status, raw = error.code, error.read()
        try:
            return status, json.loads(raw) if raw else None
        except json.JSONDecodeError:
            return status, raw.decode(errors="replace")

    def get(self, path: str):
        status, payload = self.request("GET", path)
        assert status == 200, f"GET {path} -> {status}: {payload}"
        return payload

    def queue(self, prompt: dict, extra_data: dict | None = None) -> tuple[int, dict]:
        body = {"prompt": prompt, "client_id": uuid.uuid4().hex}
        if extra_data:
            body["extra_data"] = extra_data
        return self.request("POST", "/prompt", body)

    def wait_for_history(self, prompt_id: str, timeout: float = 300.0) -> dict:
        """The /history entry of a prompt once it has finished (success or error)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None and entry["status"].get("status_str"):
                return entry
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI died while running {prompt_id}:\n{self.log_tail()}")
            time.sleep(0.5)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=20)
        self._log.close()

    @staticmethod
    def execution_error(entry: dict) -> dict | None:
        """The execution_error message of a /history entry, if any."""
        for kind, data in entry.get("status", {}).get("messages", []):
            if kind == "execution_error":
                return data
        return None

    def pack_import_failures(self) -> list[str]:
        return [line for line in self.log().splitlines() if "IMPORT FAILED" in line and PACK_LINK_NAME in line]


@dataclass(frozen=True)
class Standins:
    """Names of the stand-in models (the test copies of the workflows point their loaders at these)."""

    dir: Path
    vlm: str = TINY_VLM
    vlm_hidden_size: int = TINY_VLM_HIDDEN
    aligner: str = TINY_ALIGNER
    flux: str = COMFY_STANDINS["flux"]
    vae: str = COMFY_STANDINS["vae"]
    clip_l: str = COMFY_STANDINS["clip_l"]
    sd35: str = COMFY_STANDINS["sd35"]  # a checkpoint: MMDiT + VAE
    chroma: str = COMFY_STANDINS["chroma"]
    vision: str = VISION_ENCODER_NAME  # the tiny tower, under the workflows' encoder name
    vision_hidden_size: int = TINY_VISION_HIDDEN
    clip_aligner: str = TINY_CLIP_ALIGNER

    def install(self, home: ComfyHome) -> None:
        home.add_model("LLM", self.vlm, self.dir / self.vlm)
        home.add_model("thinkdiff", self.aligner, self.dir / self.aligner)
        home.add_model("clip_vision", self.vision, self.dir / f"{TINY_VISION}.safetensors")
        home.add_model("thinkdiff", self.clip_aligner, self.dir / self.clip_aligner)
        home.add_model("diffusion_models", self.flux, self.dir / self.flux)
        home.add_model("vae", self.vae, self.dir / self.vae)
        home.add_model("text_encoders", self.clip_l, self.dir / self.clip_l)
        home.add_model("checkpoints", self.sd35, self.dir / self.sd35)
        home.add_model("diffusion_models", self.chroma, self.dir / self.chroma)


@pytest.fixture(scope="session")
def standins(standin_dir) -> Standins:
    return Standins(standin_dir)


@pytest.fixture(scope="module")
def new_comfy_home(tmp_path_factory):
    """A factory of fresh ComfyUI home folders (see make_home)."""
    return lambda: make_home(tmp_path_factory.mktemp("comfyui_home"))


@pytest.fixture(scope="module")
def start_comfyui():
    """A factory that starts ComfyServer(home, front_end_root); every server it started is stopped afterwards."""
    servers: list[ComfyServer] = []

    def start(home: ComfyHome, front_end_root: Path | None = None) -> ComfyServer:
        server = ComfyServer(home, front_end_root=front_end_root)
        servers.append(server)
        print(f"[comfyui] ready in {server.startup_seconds:.1f} s on {server.url}, log {server.log_path}")
        return server

    yield start
    for server in servers:
        server.stop()
