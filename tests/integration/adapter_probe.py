"""Runs the adapter (nodes/comfy_adapter.py) and the VLM nodes inside a real ComfyUI's modules, with every
module-level dict, list and set of ComfyUI instrumented, and reports who wrote to them.

    python tests/integration/adapter_probe.py COMFYUI_PATH TINY_VLM_DIR REPORT.json

Run by test_adapter_in_comfyui.py with ComfyUI's python (its own venv) and `--cpu`. ComfyUI's modules are imported as
ComfyUI's main.py does (comfy.cli_args first), then every dict, list and set bound at module level in a module under
COMFYUI_PATH (and the dicts, lists and sets inside them, one level down, tuples included) is replaced, in every module
that binds it, by a subclass that records each write with the file and function that made it. Then the pack is
imported as ComfyUI imports a custom node (a package from its folder) and the adapter is driven: model folders (with
a path the user set, as extra_model_paths.yaml does through folder_paths.add_model_folder_path), devices, the tiny
VLM through ThinkDiffVLMLoader/ThinkDiffVLMEncode with the fast engine (load_models_gpu, release, an eviction by
ComfyUI's free_memory as for FLUX, which must release the engine's device buffers through the ON_DETACH callback),
and Cancel at a token that comes sooner than the throttled progress bar would update. A write whose direct writer is
a file of the pack (not ComfyUI's own public function) is a finding. A control writes once from code compiled under
the adapter's file name, so a probe that detects nothing fails.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
import types
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PACK_FILES = str(REPO_ROOT / "nodes"), str(REPO_ROOT / "thinkdiff_core"), str(REPO_ROOT / "__init__.py")
WRITES: list[dict] = []


def _record(container, method: str) -> None:
    frame = sys._getframe(2)
    WRITES.append(
        {
            "container": getattr(container, "_probe_name", "?"),
            "method": method,
            "file": frame.f_code.co_filename,
            "function": frame.f_code.co_name,
            "line": frame.f_lineno,
        }
    )


def _recording(base: type, methods: tuple[str, ...]) -> type:
    def wrap(name):
        original = getattr(base, name)

        def method(self, *args, **kwargs):
            _record(self, name)
            return original(self, *args, **kwargs)

        method.__name__ = name
        return method

    return type(f"Recording{base.__name__.capitalize()}", (base,), {name: wrap(name) for name in methods})


RecordingDict = _recording(
    dict, ("__setitem__", "__delitem__", "__ior__", "setdefault", "update", "pop", "popitem", "clear")
)
RecordingList = _recording(
    list,
    (
        "__setitem__",
        "__delitem__",
        "__iadd__",
        "__imul__",
        "append",
        "extend",
        "insert",
        "pop",
        "remove",
        "clear",
        "sort",
        "reverse",
    ),
)
RecordingSet = _recording(
    set,
    (
        "__ior__",
        "__iand__",
        "__isub__",
        "__ixor__",
        "add",
        "discard",
        "remove",
        "pop",
        "clear",
        "update",
        "difference_update",
        "intersection_update",
        "symmetric_difference_update",
    ),
)
RECORDING = {dict: RecordingDict, list: RecordingList, set: RecordingSet}


def _instrumented(value, name: str, depth: int):
    """A recording copy of a plain dict/list/set (its contents instrumented `depth` levels down), or value itself."""
    kind = type(value)
    if kind is tuple and depth > 0:
        items = tuple(_instrumented(item, f"{name}[{index}]", depth - 1) for index, item in enumerate(value))
        return items if any(a is not b for a, b in zip(items, value)) else value
    if kind not in RECORDING:
        return value
    if kind is dict:
        copy = RecordingDict()
        for key, item in value.items():
            dict.__setitem__(copy, key, _instrumented(item, f"{name}[{key!r}]", depth - 1) if depth > 0 else item)
    elif kind is list:
        copy = RecordingList(
            _instrumented(item, f"{name}[{i}]", depth - 1) if depth > 0 else item for i, item in enumerate(value)
        )
    else:
        copy = RecordingSet(value)
    copy._probe_name = name
    return copy


def instrument_comfyui(comfyui_path: Path) -> list[str]:
    """Replace every module-level dict/list/set of ComfyUI's loaded modules by a recording copy, in every module that
    binds the same object; returns the names instrumented."""
    replaced: dict[int, object] = {}
    names = []
    for module_name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None) or ""
        if not isinstance(module, types.ModuleType) or not file.startswith(str(comfyui_path)):
            continue
        for attribute, value in list(vars(module).items()):
            if type(value) not in RECORDING or attribute.startswith("__"):
                continue
            if id(value) not in replaced:
                replaced[id(value)] = (_instrumented(value, f"{module_name}.{attribute}", depth=2), value)
                names.append(f"{module_name}.{attribute}")
    for module in list(sys.modules.values()):  # `from x import y` binds the same object elsewhere: replace it there too
        if not isinstance(module, types.ModuleType):
            continue
        try:
            items = list(vars(module).items())
        except TypeError:
            continue
        for attribute, value in items:
            entry = replaced.get(id(value))
            if entry is not None and entry[1] is value:
                setattr(module, attribute, entry[0])
    return names


def import_pack():
    """The pack as ComfyUI imports a custom node: its folder as a package (here named after its folder)."""
    spec = importlib.util.spec_from_file_location(
        "ComfyUI-ThinkDiff", REPO_ROOT / "__init__.py", submodule_search_locations=[str(REPO_ROOT)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main(argv: list[str]) -> int:
    comfyui_path, vlm_dir, report_path = Path(argv[0]).resolve(), Path(argv[1]), Path(argv[2])
    from comfy.cli_args import args  # COMFYUI_PATH is on PYTHONPATH (set by the test), not a sys.path edit

    args.cpu = True
    import comfy.model_management as mm
    import comfy.model_patcher  # noqa: F401
    import comfy.patcher_extension  # noqa: F401
    import comfy.utils  # noqa: F401
    import folder_paths

    report: dict = {"comfyui_version": None, "steps": {}}
    version_file = comfyui_path / "comfyui_version.py"
    report["comfyui_version"] = version_file.read_text().split('"')[1] if version_file.exists() else None

    # As extra_model_paths.yaml would, before any custom node loads: a user path for each of the pack's folders.
    home = report_path.parent / "home"
    user_aligners, user_llm = home / "user_aligners", home / "user_llm"
    for folder in (user_aligners, user_llm, home / "models" / "thinkdiff", home / "models" / "LLM"):
        folder.mkdir(parents=True, exist_ok=True)
    folder_paths.add_model_folder_path("thinkdiff", str(user_aligners))
    folder_paths.add_model_folder_path("LLM", str(user_llm))
    (user_llm / vlm_dir.name).symlink_to(vlm_dir.resolve(), target_is_directory=True)

    report["instrumented"] = instrument_comfyui(comfyui_path)
    folder_paths.models_dir = str(home / "models")  # a module attribute (rebinding, not a container write)

    pack = import_pack()
    adapter = sys.modules["ComfyUI-ThinkDiff.nodes.comfy_adapter"]
    steps = report["steps"]
    report["adapter_file"] = adapter.__file__
    steps["in_comfyui"] = adapter.IN_COMFYUI
    steps["vlm_name"] = vlm_dir.name
    steps["aligner_paths"] = [str(p) for p in adapter.folder_paths_for("thinkdiff")]
    steps["llm_paths"] = [str(p) for p in adapter.folder_paths_for("LLM")]
    steps["vlm_folders"] = adapter.list_vlm_folders()
    steps["aligners"] = adapter.list_aligners()
    steps["vision_encoders"] = adapter.list_vision_encoders()
    steps["devices"] = [
        str(adapter.compute_device()),
        str(adapter.offload_device()),
        str(adapter.intermediate_device()),
    ]
    adapter.empty_cache()

    import numpy
    import torch

    from thinkdiff_core import standin

    loader = pack.NODE_CLASS_MAPPINGS["ThinkDiffVLMLoader"]()
    encode = pack.NODE_CLASS_MAPPINGS["ThinkDiffVLMEncode"]()
    load_inputs = {
        name: spec[1]["default"]
        for name, spec in loader.INPUT_TYPES()["required"].items()
        if len(spec) > 1 and "default" in spec[1]
    }
    load_inputs.update(model=vlm_dir.name, engine="fast")
    (vlm,) = loader.load(**load_inputs)
    image = torch.from_numpy(numpy.asarray(standin.draw_shape_image("red"), dtype="float32") / 255)[None]  # IMAGE
    encode_inputs = dict(
        vlm=vlm,
        prompt="red\nblue",
        layout="in-context words",
        num_tokens=4,
        seed=1,
        temperature=0.6,
        top_p=0.9,
        greedy=True,
        image_1=image,
    )

    def loaded() -> bool:
        return any(entry.model is vlm.patcher for entry in mm.current_loaded_models)  # read only

    result = encode.encode(**encode_inputs, keep_model_loaded=False)
    steps["text"] = result["result"][1]
    steps["released_after_encode"] = not loaded()
    steps["states_after_release"] = len(vlm.model.fast_decoder()._states)

    encode.encode(**encode_inputs, keep_model_loaded=True)
    steps["loaded_when_kept"] = loaded()
    steps["states_when_kept"] = len(vlm.model.fast_decoder()._states)
    mm.free_memory(1e30, vlm.patcher.load_device)  # what loading FLUX does when memory is short: evict everything
    steps["loaded_after_eviction"] = loaded()
    steps["states_after_eviction"] = len(vlm.model.fast_decoder()._states)

    on_token = adapter.token_progress(100)
    on_token(1)
    mm.interrupt_current_processing(True)
    started = time.perf_counter()
    try:
        on_token(2)  # well within ProgressBar's 100 ms throttle window since the last update
        steps["interrupt"] = "not raised"
    except mm.InterruptProcessingException:
        steps["interrupt"] = f"raised after {time.perf_counter() - started:.4f} s"
    finally:
        mm.interrupt_current_processing(False)

    # Control: a direct write attributed to the adapter's file must be found.
    control = compile(
        "folder_paths.folder_names_and_paths['thinkdiff_probe_control'] = ([], set())", adapter.__file__, "exec"
    )
    exec(control, {"folder_paths": folder_paths})  # noqa: S102 (the control write: our own constant code)
    dict.pop(folder_paths.folder_names_and_paths, "thinkdiff_probe_control")

    report["writes"] = WRITES
    report["pack_writes"] = [write for write in WRITES if write["file"].startswith(PACK_FILES)]
    report_path.write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
