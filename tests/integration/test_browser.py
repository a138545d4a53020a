"""The shipped UI workflows in ComfyUI's real frontend, in headless Chromium (opt-in; see scripts/comfyui_integration.sh).

Needs COMFYUI_PATH, the frontend package pinned in ComfyUI's requirements.txt (comfyui-frontend-package, pip),
Debian's /usr/bin/chromium (or CHROMIUM) and `npm ci` in tests/integration/browser (playwright-core only: it drives
the system Chromium and downloads no browser).

For every workflows/*.json: the frontend loads it through `window.app.loadGraphData` with no unknown node types and
no dialog (missing nodes or models); `app.graphToPrompt()` gives exactly the committed API copy in workflows/api/
(so the positional widgets_values the frontend reads match the inputs the API copy names); POST /prompt with that
output passes ComfyUI's validation with no node_errors; saving it again keeps every widget value and link (a widget
fed by a link, as the VLM text into CLIPTextEncodeFlux, stays an input entry with a "widget" key at the same slot);
and a screenshot of the graph goes to docs/images/<name>.png.

Why validation only: ComfyUI validates a prompt fully before queueing it (node types, links, input types, combo
values, LoadImage files), so a clean /prompt reply is the strongest check short of running the real models. Combo
values are checked against the files present, so the test puts an empty placeholder file under every name the
workflow uses (from each loader's properties.models hints, a folder with a config.json for the VLM, and a tiny real
BLIP-2 vision tower file for the vision loader, which lists only files whose header marks them). The queued
prompt then cannot run: it fails at its first loader, on an empty file, and the test waits for that and moves on.
Running the graph on stand-in weights is test_comfyui_server.py's job.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from .conftest import make_vision_tower_file

pytestmark = pytest.mark.browser  # skipped by conftest.py unless COMFYUI_PATH, chromium, node and playwright-core exist

REPO_ROOT = Path(__file__).resolve().parents[2]
UI_WORKFLOWS = sorted((REPO_ROOT / "workflows").glob("*.json"))
SCREENSHOT_DIR = REPO_ROOT / "docs" / "images"
BROWSER_DIR = Path(__file__).resolve().parent / "browser"


def add_placeholders(home, workflow: dict) -> None:
    """Empty files (and a VLM folder, a tiny vision tower) under every model name the workflow selects, so combo
    validation passes."""
    for node in workflow["nodes"]:
        for model in node.get("properties", {}).get("models", []):
            if model["name"] in node.get("widgets_values", []):
                path = home.models / model["directory"] / model["name"]
                if not path.exists():
                    home.add_model(model["directory"], model["name"])
        if node["type"] == "ThinkDiffVLMLoader":
            folder = home.models / "LLM" / node["widgets_values"][0]
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "config.json").write_text("{}")
        if node["type"] == "ThinkDiffVisionLoader":
            # Listed only if it is a BLIP-2 folder or a file whose header says it is a vision tower: a real tiny one.
            path = home.models / "clip_vision" / node["widgets_values"][0]
            if not path.exists():
                make_vision_tower_file(path)


@pytest.fixture(scope="module")
def server(new_comfy_home, start_comfyui):
    home = new_comfy_home()
    for path in UI_WORKFLOWS:
        add_placeholders(home, json.loads(path.read_text()))
    return start_comfyui(home)  # no --front-end-root: the pip-installed frontend package


@pytest.fixture(scope="module")
def frontend(server, tmp_path_factory):
    """Runs check_workflows.mjs once for all workflows; returns its report keyed by workflow name."""
    SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
    result = tmp_path_factory.mktemp("browser") / "result.json"
    config = {
        "url": server.url,
        "chromium": os.environ.get("CHROMIUM", "/usr/bin/chromium"),
        "workflows": [
            {"name": p.stem, "path": str(p), "screenshot": str(SCREENSHOT_DIR / f"{p.stem}.png")} for p in UI_WORKFLOWS
        ],
        "result": str(result),
    }
    started = time.perf_counter()
    run = subprocess.run(
        ["node", "check_workflows.mjs", json.dumps(config)],
        cwd=BROWSER_DIR,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, f"browser script failed:\n{run.stdout}\n{run.stderr}\n{server.log_tail()}"
    report = json.loads(result.read_text())
    print(
        f"[browser] {len(UI_WORKFLOWS)} workflow(s) in {time.perf_counter() - started:.1f} s, frontend {report.get('frontend_version')}"
    )
    report["by_name"] = {entry["name"]: entry for entry in report["workflows"]}
    return report


@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_loads_in_the_frontend(frontend, path):
    entry = frontend["by_name"][path.stem]
    assert entry["missing_node_types"] == [], f"the frontend does not know {entry['missing_node_types']}"
    assert entry["dialogs"] == [], f"dialogs opened on load: {entry['dialogs']}"
    assert entry["node_count"] == len(json.loads(path.read_text())["nodes"])
    assert (SCREENSHOT_DIR / f"{path.stem}.png").stat().st_size > 10_000


@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=lambda p: p.stem)
def test_frontend_prompt_equals_the_api_copy(frontend, path):
    api_path = REPO_ROOT / "workflows" / "api" / f"{path.stem}.api.json"
    if not api_path.exists():
        pytest.skip(f"no API copy {api_path.name}")
    expected = json.loads(api_path.read_text())
    output = frontend["by_name"][path.stem]["output"]
    assert sorted(output) == sorted(expected)
    for key, node in expected.items():
        assert output[key]["class_type"] == node["class_type"]
        assert output[key]["inputs"] == node["inputs"], f"node {key} ({node['class_type']})"


@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=lambda p: p.stem)
def test_frontend_keeps_the_widget_values(frontend, path):
    """Loading and saving again changes no widgets_values: the positional values fit the frontend's widgets."""
    saved = frontend["by_name"][path.stem]["widgets_values"]
    for node in json.loads(path.read_text())["nodes"]:
        assert saved[str(node["id"])] == node.get("widgets_values", []), f"node {node['id']} ({node['type']})"


@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=lambda p: p.stem)
def test_frontend_prompt_passes_validation(server, frontend, path):
    output = frontend["by_name"][path.stem]["output"]
    status, reply = server.queue(output)
    assert status == 200, f"POST /prompt -> {status}: {json.dumps(reply, indent=1)[:3000]}"
    assert reply["node_errors"] == {}, reply["node_errors"]
    # It cannot run on placeholder files; let it fail at its first loader before the next test.
    entry = server.wait_for_history(reply["prompt_id"], timeout=120)
    assert entry["status"]["status_str"] == "error"


@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=lambda p: p.stem)
def test_frontend_keeps_the_links(frontend, path):
    """Loading and saving again keeps every link: same ends and slots, and a widget fed by a link (the VLM text into
    CLIPTextEncodeFlux) stays an input entry with a "widget" key at the slot our file gives it."""
    workflow = json.loads(path.read_text())
    entry = frontend["by_name"][path.stem]
    assert sorted(map(tuple, entry["links"])) == sorted(map(tuple, workflow["links"]))
    for node in workflow["nodes"]:
        saved = entry["inputs"][str(node["id"])]
        for slot, expected in enumerate(node["inputs"]):
            assert slot < len(saved), f"node {node['id']} ({node['type']}): input {expected['name']} lost"
            got = saved[slot]
            assert (got["name"], got["link"]) == (expected["name"], expected["link"]), f"node {node['id']} slot {slot}"
            assert got["widget"] == expected.get("widget", {}).get("name"), f"node {node['id']} ({node['type']}) {got}"
