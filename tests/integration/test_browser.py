"""The shipped UI workflows in ComfyUI's real frontend, in headless Chromium (opt-in; see scripts/comfyui_integration.sh).

Needs COMFYUI_PATH, Debian's /usr/bin/chromium (or CHROMIUM) and `npm ci` in tests/integration/browser
(playwright-core only: it drives the system Chromium and downloads no browser). Every test runs once per frontend in
THINKDIFF_FRONTENDS (space- or comma-separated versions, default "installed": the comfyui-frontend-package that
ComfyUI's requirements installed); a version is served with --front-end-root from
THINKDIFF_FRONTEND_CACHE/<version>/comfyui_frontend_package/static (the script fetches the wheels from PyPI). One
server at a time: each frontend's server stops before the next starts.

For every workflows/*.json: the frontend loads it through `window.app.loadGraphData` with no unknown node types and
no dialog (missing nodes or models); `app.graphToPrompt()` gives the committed API copy in workflows/api/: the same
class_type, inputs and `_meta.title` for every node (so the positional widgets_values the frontend reads match the
inputs the API copy names, and untitled nodes carry their display names), except the `preview` value frontend 1.27.10
still sends for PreviewAny's read-only text box (not an input of the node; 1.49.6 and later no longer send it);
the page logs no console error beyond each frontend's known page-load noise; POST /prompt with that
output passes ComfyUI's validation with no node_errors; saving it again keeps every widget value and link (a widget
fed by a link, as the VLM text into CLIPTextEncodeFlux, stays an input entry with a "widget" key at the same slot);
and a screenshot of the graph is taken (and copied to docs/images/<name>.png only with
THINKDIFF_UPDATE_SCREENSHOTS=1, from frontend SCREENSHOT_FRONTEND: a test run leaves the checkout as it was).

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
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from .conftest import ComfyServer, make_vision_tower_file

pytestmark = pytest.mark.browser  # skipped by conftest.py unless COMFYUI_PATH, chromium, node and playwright-core exist

REPO_ROOT = Path(__file__).resolve().parents[2]
UI_WORKFLOWS = sorted((REPO_ROOT / "workflows").glob("*.json"))
SCREENSHOT_DIR = REPO_ROOT / "docs" / "images"
BROWSER_DIR = Path(__file__).resolve().parent / "browser"
FRONTENDS = os.environ.get("THINKDIFF_FRONTENDS", "installed").replace(",", " ").split() or ["installed"]
FRONTEND_CACHE = Path(os.environ.get("THINKDIFF_FRONTEND_CACHE", REPO_ROOT / ".cache" / "comfyui-frontends"))
# Screenshots for docs/images/ come from this frontend (or the only one tested).
SCREENSHOT_FRONTEND = "1.27.10"
# Inputs a frontend sends that are not inputs of the node (the server ignores them): 1.27.10's PreviewAny text box.
FRONTEND_ONLY_INPUTS = {"PreviewAny": {"preview"}}
# Console errors while the page loads that are not the pack's (observed: no internet, no user data yet, frontend
# start-up order); anything else fails test_no_console_errors.
PAGE_LOAD_NOISE = (
    "/api/userdata",  # 404s for settings and workflows a new user does not have
    "Failed to load resource: the server responded with a status of 404",
    "net::ERR_NAME_NOT_RESOLVED",  # no internet: the frontend's remote look-ups
    "net::ERR_INTERNET_DISCONNECTED",
    "Cannot read properties of undefined (reading 'id')",  # 1.27.10 on load
    "ComfyApp graph accessed before initialization",  # 1.49.6
    "deprecated",  # 1.49.6 and later: deprecation warnings logged as errors
    "Failed to fetch jobs: 404",  # 1.49.6 and later asking a server older than them (0.3.64) for /api/jobs
)


def frontend_root(version: str) -> Path | None:
    """--front-end-root for a frontend version; None for "installed" (ComfyUI's own pip-installed package)."""
    if version == "installed":
        return None
    root = FRONTEND_CACHE / version / "comfyui_frontend_package" / "static"
    if not (root / "index.html").is_file():
        pytest.fail(
            f"frontend {version} is not unpacked at {root}: run scripts/comfyui_integration.sh (it fetches "
            f"comfyui-frontend-package=={version} from PyPI), or set THINKDIFF_FRONTEND_CACHE"
        )
    return root


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


@pytest.fixture(scope="module", params=FRONTENDS, ids=lambda version: f"frontend-{version}")
def server(request, new_comfy_home):
    """A server with placeholder model files, serving one frontend; stopped before the next frontend's starts."""
    home = new_comfy_home()
    for path in UI_WORKFLOWS:
        add_placeholders(home, json.loads(path.read_text()))
    server = ComfyServer(home, front_end_root=frontend_root(request.param))
    server.frontend = request.param
    print(f"[comfyui] frontend {request.param}: ready in {server.startup_seconds:.1f} s on {server.url}")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def frontend(server, tmp_path_factory):
    """Runs check_workflows.mjs once for all workflows; returns its report keyed by workflow name."""
    shots = tmp_path_factory.mktemp(f"screenshots-{server.frontend}")
    result = tmp_path_factory.mktemp("browser") / "result.json"
    config = {
        "url": server.url,
        "chromium": os.environ.get("CHROMIUM", "/usr/bin/chromium"),
        "workflows": [
            {"name": p.stem, "path": str(p), "screenshot": str(shots / f"{p.stem}.png")} for p in UI_WORKFLOWS
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
        f"[browser] {len(UI_WORKFLOWS)} workflow(s) in {time.perf_counter() - started:.1f} s, "
        f"frontend {report.get('frontend_version')}"
    )
    report["by_name"] = {entry["name"]: entry for entry in report["workflows"]}
    report["screenshots"] = shots
    if os.environ.get("THINKDIFF_UPDATE_SCREENSHOTS") == "1" and server.frontend in (SCREENSHOT_FRONTEND, "installed"):
        SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
        for shot in shots.glob("*.png"):
            shutil.copyfile(shot, SCREENSHOT_DIR / shot.name)
    return report


def test_the_requested_frontend_is_served(server, frontend):
    if server.frontend == "installed":
        assert frontend["frontend_version"], "the page reports no frontend version"
    else:
        assert frontend["frontend_version"] == server.frontend


def test_no_console_errors(frontend):
    """Nothing but the frontend's own page-load noise (PAGE_LOAD_NOISE) is logged as an error while the page loads
    and the workflows load, validate and are saved again."""
    errors = [error for error in frontend["console_errors"] if not any(noise in error for noise in PAGE_LOAD_NOISE)]
    assert errors == [], "\n".join(errors)


@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_loads_in_the_frontend(frontend, path):
    entry = frontend["by_name"][path.stem]
    assert entry["missing_node_types"] == [], f"the frontend does not know {entry['missing_node_types']}"
    assert entry["dialogs"] == [], f"dialogs opened on load: {entry['dialogs']}"
    assert entry["node_count"] == len(json.loads(path.read_text())["nodes"])
    assert (frontend["screenshots"] / f"{path.stem}.png").stat().st_size > 10_000


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
        inputs = dict(output[key]["inputs"])
        for name in FRONTEND_ONLY_INPUTS.get(node["class_type"], ()):
            assert inputs.pop(name, "") == "", f"node {key} ({node['class_type']}): {name} = {inputs.get(name)!r}"
        assert inputs == node["inputs"], f"node {key} ({node['class_type']})"
        assert output[key]["_meta"]["title"] == node["_meta"]["title"], f"node {key} ({node['class_type']})"


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
