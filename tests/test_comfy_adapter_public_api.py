"""The adapter's source writes no ComfyUI module state: no assignment into, and no mutating call on, anything reached
from a ComfyUI module (folder_paths, comfy.*). A static check that runs without ComfyUI; inside real ComfyUI 0.3.64
and 0.33.0, tests/integration/test_adapter_in_comfyui.py records every write while the adapter runs."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ADAPTER = Path(__file__).resolve().parents[1] / "nodes" / "comfy_adapter.py"
MUTATORS = {
    "append",
    "extend",
    "insert",
    "pop",
    "popitem",
    "remove",
    "clear",
    "update",
    "setdefault",
    "add",
    "discard",
    "sort",
    "reverse",
    "difference_update",
    "intersection_update",
    "symmetric_difference_update",
}


def comfy_names(tree: ast.Module) -> set[str]:
    """Local names bound to ComfyUI modules or their members by the module's imports."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in ("comfy", "folder_paths"):
                    names.add(alias.asname or alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("comfy", "folder_paths"):
            names.update(alias.asname or alias.name for alias in node.names)
    return names


def root_name(node: ast.AST) -> str | None:
    while isinstance(node, (ast.Attribute, ast.Subscript, ast.Call)):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node.id if isinstance(node, ast.Name) else None


def comfy_state_writes(source: str) -> list[str]:
    """Lines that assign into, delete from or call a mutating method on something reached from a ComfyUI module."""
    tree = ast.parse(source)
    names = comfy_names(tree)
    found = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, (ast.Assign, ast.Delete)):
            targets = node.targets
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        for target in targets:
            if isinstance(target, (ast.Attribute, ast.Subscript)) and root_name(target) in names:
                found.append(f"line {node.lineno}: {ast.unparse(target)}")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in MUTATORS:
            if isinstance(node.func.value, (ast.Attribute, ast.Subscript)) and root_name(node.func.value) in names:
                found.append(f"line {node.lineno}: {ast.unparse(node.func)}(...)")
    return found


def test_the_adapter_writes_no_comfyui_module_state():
    assert comfy_state_writes(ADAPTER.read_text()) == []


def test_the_adapter_still_uses_the_public_functions():
    source = ADAPTER.read_text()
    for call in (
        "folder_paths.add_model_folder_path(",
        "model_management.load_models_gpu(",
        "model_management.free_memory(",
        "add_callback(CallbacksMP.ON_DETACH",
        "model_management.throw_exception_if_processing_interrupted()",
    ):
        assert call in source


IMPORTS = "import comfy.model_management as model_management\nimport folder_paths\n"


@pytest.mark.parametrize(
    "body",
    [
        "folder_paths.folder_names_and_paths[key] = (paths, exts)",
        "folder_paths.folder_names_and_paths['LLM'][0].append(path)",
        "model_management.current_loaded_models.remove(loaded)",
        "del model_management.current_loaded_models[0]",
        "model_management.current_loaded_models += [loaded]",
        "folder_paths.models_dir = '/tmp'",
    ],
)
def test_the_check_finds_direct_writes(body):
    """The writes the adapter made before it used the public functions, and their kin, are found."""
    assert comfy_state_writes(IMPORTS + body + "\n")


def test_the_check_lets_reads_and_local_copies_pass():
    body = (
        "others = [x for x in model_management.current_loaded_models if x is not y]\n"
        "others.append(1)\n"
        "paths = list(folder_paths.get_folder_paths('LLM'))\n"
        "paths.append('x')\n"
    )
    assert comfy_state_writes(IMPORTS + body) == []
