"""The shipped workflows are what workflows/build_workflows.py makes of the node classes as they are now.

The builder reads every ThinkDiff node's widgets, defaults and sockets from its INPUT_TYPES, so a widget added to a
node changes the generated JSON; these tests fail until the files are regenerated (`python -m workflows.build_workflows`
from the pack's root) and committed. The widget check below recomputes the stored layout from INPUT_TYPES on its own,
without the builder's code, and a monkeypatched INPUT_TYPES shows both checks catch a node that changed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from workflows import build_workflows
from workflows.pictures import INPUT_IMAGES

WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"
UI_FILES = sorted(WORKFLOWS.glob("*.json"))


def stale_files() -> list[str]:
    """Workflow files (under workflows/) whose committed text differs from what the builder makes now."""
    generated = build_workflows.workflow_files()
    committed = {path.name for path in UI_FILES} | {f"api/{path.name}" for path in (WORKFLOWS / "api").glob("*.json")}
    stale = sorted(committed ^ set(generated))  # files the builder no longer makes, or makes but are not committed
    stale += [name for name, text in generated.items() if name in committed and (WORKFLOWS / name).read_text() != text]
    return stale


def stored_widgets(node_type: str) -> list[tuple[str, object, dict]]:
    """(name, type, options) for each value the UI format stores for a pack node: its widgets in INPUT_TYPES order
    (required, then optional), each INT with control_after_generate followed by that UI-only value."""
    input_types = NODE_CLASS_MAPPINGS[node_type].INPUT_TYPES()
    stored = []
    for section in ("required", "optional"):
        for name, spec in input_types.get(section, {}).items():
            options = spec[1] if len(spec) > 1 else {}
            if isinstance(spec[0], (list, tuple)) or spec[0] in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"):
                stored.append((name, spec[0], options))
                if options.get("control_after_generate"):
                    stored.append(("control_after_generate", "UI", {}))
    return stored


def fits(value: object, kind: object, options: dict) -> bool:
    if isinstance(kind, (list, tuple)):  # a combo; one without a default lists the user's model files
        return isinstance(value, str) and (value in kind or "default" not in options)
    expected = {"INT": int, "FLOAT": (int, float), "STRING": str, "BOOLEAN": bool, "COMBO": str, "UI": str}[kind]
    return isinstance(value, expected) and (kind == "BOOLEAN" or not isinstance(value, bool))


def widget_mismatches(ui_path: Path) -> list[str]:
    """Where a UI workflow's pack nodes disagree with INPUT_TYPES: the number, type or choice of the stored values,
    the socket list, or the API copy's inputs."""
    workflow = json.loads(ui_path.read_text())
    api = json.loads((WORKFLOWS / "api" / f"{ui_path.stem}.api.json").read_text())
    problems = []
    for node in workflow["nodes"]:
        if node["type"] not in NODE_CLASS_MAPPINGS:
            continue
        where = f"{ui_path.name} node {node['id']} ({node['type']})"
        stored, values = stored_widgets(node["type"]), node["widgets_values"]
        if len(values) != len(stored):
            problems.append(f"{where}: {len(values)} widgets_values, INPUT_TYPES has {[n for n, _, _ in stored]}")
            continue
        problems += [
            f"{where}: {name} = {value!r} does not fit {kind!r}"
            for (name, kind, options), value in zip(stored, values)
            if not fits(value, kind, options)
        ]
        widget_names = {name for name, kind, _ in stored if kind != "UI"}
        input_types = NODE_CLASS_MAPPINGS[node["type"]].INPUT_TYPES()
        sockets = [n for s in ("required", "optional") for n in input_types.get(s, {}) if n not in widget_names]
        if [entry["name"] for entry in node["inputs"]] != sockets:
            problems.append(f"{where}: inputs {[e['name'] for e in node['inputs']]}, INPUT_TYPES sockets {sockets}")
        api_inputs = api[str(node["id"])]["inputs"]
        api_widgets = {name: value for (name, kind, _), value in zip(stored, values) if kind != "UI"}
        if {name: api_inputs.get(name) for name in api_widgets} != api_widgets:
            problems.append(f"{where}: API inputs {api_inputs} do not match widgets_values {api_widgets}")
        if set(api_inputs) - widget_names - set(sockets):
            problems.append(f"{where}: API inputs {sorted(set(api_inputs) - widget_names - set(sockets))} unknown")
    return problems


def test_committed_workflows_are_what_the_builder_makes():
    assert not stale_files(), "regenerate: python -m workflows.build_workflows (from the pack's root), then commit"


@pytest.mark.parametrize("ui_path", UI_FILES, ids=[path.stem for path in UI_FILES])
def test_pack_widgets_follow_input_types(ui_path):
    assert not widget_mismatches(ui_path)


def test_every_pack_node_class_is_in_a_workflow():
    used = {node["type"] for path in UI_FILES for node in json.loads(path.read_text())["nodes"]}
    assert set(NODE_CLASS_MAPPINGS) <= used


def _with_input_types(monkeypatch, node_type: str, change) -> None:
    node_class = NODE_CLASS_MAPPINGS[node_type]
    original = node_class.INPUT_TYPES

    def changed(cls):
        input_types = {section: dict(inputs) for section, inputs in original().items()}
        change(input_types)
        return input_types

    monkeypatch.setattr(node_class, "INPUT_TYPES", classmethod(changed))


def _add_widget(input_types):
    input_types["optional"]["extra_widget"] = ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0})


def _drop_widget(input_types):
    del input_types["required"]["strength"]


def _swap_widgets(input_types):
    required = input_types["required"]
    input_types["required"] = {name: required[name] for name in ("aligner", "features", "strength", "mode")}


@pytest.mark.parametrize("change", [_add_widget, _drop_widget, _swap_widgets], ids=["added", "dropped", "reordered"])
def test_a_changed_node_fails_both_checks(monkeypatch, change):
    """A widget added, removed or moved on ThinkDiffConditioning (in every shipped workflow) is caught."""
    _with_input_types(monkeypatch, "ThinkDiffConditioning", change)
    assert stale_files()
    for ui_path in UI_FILES:
        assert any("ThinkDiffConditioning" in problem for problem in widget_mismatches(ui_path)), ui_path.name


def test_new_widget_default_goes_into_the_workflow(monkeypatch):
    _with_input_types(monkeypatch, "ThinkDiffConditioning", _add_widget)
    node = build_workflows.thinkdiff_conditioning(1, (0, 0), "prepend", 128)
    assert [(w.name, w.value) for w in node.widgets] == [
        ("mode", "prepend"),
        ("strength", 1.0),
        ("text_tokens", 128),
        ("family", "auto"),
        ("extra_widget", 0.5),
    ]


@pytest.mark.parametrize("ui_path", UI_FILES, ids=[path.stem for path in UI_FILES])
def test_api_titles_are_what_the_frontend_writes(ui_path):
    """`_meta.title` is the node's title, else its display name (the pack's NODE_DISPLAY_NAME_MAPPINGS), as every
    frontend writes it; PreviewAny sends only `source` (its `preview` box is the frontend's, not the node's)."""
    api = json.loads((WORKFLOWS / "api" / f"{ui_path.stem}.api.json").read_text())
    for node in json.loads(ui_path.read_text())["nodes"]:
        if str(node["id"]) not in api:
            continue  # a note: frontend only
        entry = api[str(node["id"])]
        expected = node.get("title") or NODE_DISPLAY_NAME_MAPPINGS.get(node["type"])
        expected = expected or build_workflows.CORE_DISPLAY_NAMES[node["type"]]
        assert entry["_meta"]["title"] == expected, f"node {node['id']} ({node['type']})"
        if node["type"] == "PreviewAny":
            assert sorted(entry["inputs"]) == ["source"]


def test_a_core_node_without_a_stable_display_name_needs_a_title():
    with pytest.raises(build_workflows.WorkflowSpecError, match="DualCLIPLoader has no display name .* give the node"):
        build_workflows.display_name("DualCLIPLoader")


def test_a_value_for_a_widget_the_node_lacks_is_an_error():
    with pytest.raises(build_workflows.WorkflowSpecError, match="ThinkDiffConditioning has no widget 'strenght'"):
        build_workflows.pack_node(1, "ThinkDiffConditioning", (0, 0), (340, 150), {"strenght": 2.0})
    with pytest.raises(build_workflows.WorkflowSpecError, match="'conditioning' .*socket"):
        build_workflows.pack_node(1, "ThinkDiffConditioning", (0, 0), (340, 150), {"conditioning": 0})


def test_a_model_file_must_be_named():
    with pytest.raises(build_workflows.WorkflowSpecError, match="ThinkDiffAlignerLoader.aligner has no default"):
        build_workflows.pack_node(1, "ThinkDiffAlignerLoader", (0, 0), (340, 60))


def test_a_fixed_choice_must_exist():
    with pytest.raises(build_workflows.WorkflowSpecError, match="ThinkDiffConditioning.mode = 'prepnd'"):
        build_workflows.thinkdiff_conditioning(1, (0, 0), "prepnd", 128)


@pytest.mark.parametrize("name", sorted(INPUT_IMAGES))
def test_input_pictures_are_the_drawings(name):
    committed = Image.open(WORKFLOWS / "input" / name)
    drawn = INPUT_IMAGES[name]()
    assert (committed.mode, committed.size) == (drawn.mode, drawn.size)
    assert committed.tobytes() == drawn.tobytes()
