"""The adapter inside a real ComfyUI writes none of ComfyUI's module-level dicts or lists itself (opt-in: set
COMFYUI_PATH; see scripts/comfyui_integration.sh).

adapter_probe.py runs in ComfyUI's python with ComfyUI's modules imported as main.py imports them and every
module-level dict, list and set of ComfyUI replaced by a recording copy; it drives the adapter and the VLM nodes (the
tiny Qwen2-VL stand-in, fast engine) and reports each write with its direct writer. Checked here:
- no write comes directly from the pack's files (nodes/, thinkdiff_core/), while ComfyUI's own public functions
  (folder_paths.add_model_folder_path, model_management.load_models_gpu / free_memory) did write, and a control
  write compiled under the adapter's file name was caught;
- model folders: the user's paths (extra_model_paths.yaml) stay first, models/thinkdiff and models/LLM follow;
- model management: the VLM is on ComfyUI's list while kept loaded, off it after release and after an eviction by
  ComfyUI's free_memory; the fast engine's device buffers go with it through the ModelPatcher ON_DETACH callback;
- Cancel: throw_exception_if_processing_interrupted raises at the very next token, sooner than ProgressBar's
  100 ms throttle (0.33) would let a progress update through.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from .conftest import COMFYUI_PATH, REPO_ROOT, comfyui_python

pytestmark = pytest.mark.comfyui  # skipped by conftest.py unless COMFYUI_PATH is set


@pytest.fixture(scope="module")
def probe(standins, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("adapter_probe")
    run = subprocess.run(
        [
            comfyui_python(),
            str(Path(__file__).with_name("adapter_probe.py")),
            COMFYUI_PATH,
            str(standins.dir / standins.vlm),
            str(out / "report.json"),
        ],
        cwd=out,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": COMFYUI_PATH},
    )
    assert run.returncode == 0, f"adapter probe failed:\n{run.stdout[-4000:]}\n{run.stderr[-6000:]}"
    return json.loads((out / "report.json").read_text())


def by_container(writes: list[dict], container: str) -> list[dict]:
    return [write for write in writes if write["container"].startswith(container)]


def test_the_probe_watches_comfyuis_module_state(probe):
    instrumented = set(probe["instrumented"])
    assert {"folder_paths.folder_names_and_paths", "comfy.model_management.current_loaded_models"} <= instrumented
    assert len(instrumented) > 20, sorted(instrumented)
    assert probe["steps"]["in_comfyui"] is True


def test_the_adapter_writes_no_comfyui_module_state_itself(probe):
    def is_control(write: dict) -> bool:  # the probe's own write, compiled under the adapter's file name
        return write["file"].endswith("comfy_adapter.py") and write["function"] == "<module>"

    assert len([write for write in probe["pack_writes"] if is_control(write)]) == 1, "the control write was missed"
    findings = [write for write in probe["pack_writes"] if not is_control(write)]
    assert findings == [], "the pack wrote ComfyUI's module state directly:\n" + "\n".join(map(str, findings))


def test_comfyuis_public_functions_did_the_writing(probe):
    writes = probe["writes"]
    folders = by_container(writes, "folder_paths.folder_names_and_paths")
    assert any(w["file"].endswith("folder_paths.py") and w["function"] == "add_model_folder_path" for w in folders)
    loaded = by_container(writes, "comfy.model_management.current_loaded_models")
    writers = {(Path(w["file"]).name, w["function"]) for w in loaded}
    assert ("model_management.py", "load_models_gpu") in writers, writers
    assert ("model_management.py", "free_memory") in writers, writers


def test_user_model_paths_stay_first(probe):
    steps = probe["steps"]
    assert Path(steps["aligner_paths"][0]).name == "user_aligners"
    assert Path(steps["aligner_paths"][-1]).parts[-2:] == ("models", "thinkdiff")
    assert Path(steps["llm_paths"][0]).name == "user_llm"
    assert Path(steps["llm_paths"][-1]).parts[-2:] == ("models", "LLM")
    assert steps["vlm_folders"] == [steps["vlm_name"]]  # found through the user's path


def test_vlm_is_managed_by_comfyui_and_evicted_with_its_buffers(probe):
    steps = probe["steps"]
    assert steps["text"]  # the tiny VLM generated through the nodes
    assert steps["released_after_encode"] is True
    assert steps["states_after_release"] == 0
    assert steps["loaded_when_kept"] is True and steps["states_when_kept"] > 0
    assert steps["loaded_after_eviction"] is False
    assert steps["states_after_eviction"] == 0, "ON_DETACH did not release the fast engine's buffers"


def test_cancel_is_checked_at_every_token(probe):
    assert probe["steps"]["interrupt"].startswith("raised after"), probe["steps"]["interrupt"]


def test_probe_ran_in_the_comfyui_under_test(probe):
    version_file = Path(COMFYUI_PATH) / "comfyui_version.py"
    assert probe["comfyui_version"] and probe["comfyui_version"] in version_file.read_text()
    assert Path(probe["adapter_file"]).resolve() == REPO_ROOT / "nodes" / "comfy_adapter.py"
