"""Packaging rules: requirements in step with pyproject, registry metadata, no eval/exec, no silent downloads."""

import ast
import re
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ["thinkdiff_core", "nodes", "train", "scripts", "workflows"]


def python_files():
    files = [ROOT / "__init__.py"]
    for folder in SOURCE_DIRS:
        files += sorted((ROOT / folder).rglob("*.py"))
    return files


def test_requirements_txt_matches_pyproject_dependencies():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    lines = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    requirements = [line for line in lines if line and not line.startswith("#")]
    assert requirements == pyproject["project"]["dependencies"]


def test_registry_metadata():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "comfyui" not in pyproject["project"]["name"].lower()
    assert pyproject["tool"]["comfy"]["PublisherId"]
    assert pyproject["project"]["urls"]["Repository"]


def test_no_eval_or_exec_calls():
    for path in python_files():
        tree = ast.parse(path.read_text(), filename=str(path))
        calls = [
            node.func.id for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
        ]
        assert not {"eval", "exec"} & set(calls), path


def test_weights_never_load_with_unsafe_pickle():
    for path in python_files():
        for match in re.finditer(r"torch\.load\(([^)]*)\)", path.read_text()):
            assert "weights_only=True" in match.group(1), f"{path}: {match.group(0)}"


def test_model_loading_is_local_only():
    for path in python_files():
        text = path.read_text()
        for call in re.finditer(r"\.from_pretrained\(", text):
            window = text[call.start() : call.start() + 300]
            assert "local_files_only=True" in window or "standin" in path.name, (
                f"{path}: from_pretrained without local_files_only"
            )


def test_reliability_table_names_real_tests():
    """Every test RELIABILITY.md cites exists (file and function), so the table cannot drift from the suite."""
    text = (ROOT / "RELIABILITY.md").read_text()
    cited = set(re.findall(r"`((?:integration/)?test_[a-z_]+\.py)::(test_[a-z0-9_]+)`", text))
    bare = set(re.findall(r"`(test_[a-z0-9_]+)`", text))
    assert len(cited) > 20
    sources = {
        path.relative_to(ROOT / "tests").as_posix(): path.read_text() for path in (ROOT / "tests").rglob("test_*.py")
    }
    for file, name in cited:
        assert f"def {name}(" in sources[file], f"RELIABILITY.md cites {file}::{name}, which does not exist"
    everything = "\n".join(sources.values())
    for name in bare:
        assert f"def {name}(" in everything, f"RELIABILITY.md cites {name}, which does not exist"


def test_ruff_finds_nothing():
    """Lint (including the registry's S102/S307 exec/eval rules) as part of the suite, so CI enforces it."""
    import subprocess
    import sys

    missing = subprocess.run([sys.executable, "-m", "ruff", "--version"], capture_output=True).returncode
    assert not missing, "ruff is not installed: pip install -r requirements-dev.txt (CI must lint, not skip)"
    result = subprocess.run([sys.executable, "-m", "ruff", "check", str(ROOT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:]
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "format", "--check", "--output-format", "concise", str(ROOT)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, f"run `ruff format .`:\n{result.stdout[-3000:]}"


def test_pack_entry_loads_the_way_comfyui_loads_it():
    """ComfyUI imports a custom-node folder as a package named after the folder (nodes.py, load_custom_node): the
    entry must give the node mappings there, with `nodes` imported relatively (ComfyUI's own `nodes` is top-level)."""
    import importlib.util
    import sys

    name = "ComfyUI-ThinkDiff-test-entry"
    spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        assert module.__package__ == name and "ThinkDiffVLMEncode" in module.NODE_CLASS_MAPPINGS
        assert sys.modules[f"{name}.nodes"].NODE_CLASS_MAPPINGS is module.NODE_CLASS_MAPPINGS
    finally:
        for key in [key for key in sys.modules if key == name or key.startswith(name + ".")]:
            del sys.modules[key]


def test_sys_path_is_edited_in_the_pack_entry_only():
    """One documented way to import the checkout: `pip install -e .`, plus the pack entry for ComfyUI."""
    for path in python_files() + sorted((ROOT / "bench").glob("*.py")) + sorted((ROOT / "tests").rglob("*.py")):
        if path != ROOT / "__init__.py":
            tree = ast.parse(path.read_text())
            uses = [
                node.lineno
                for node in ast.walk(tree)
                if isinstance(node, ast.Attribute)
                and node.attr == "path"
                and isinstance(node.value, ast.Name)
                and node.value.id == "sys"
            ]
            assert not uses, f"{path.relative_to(ROOT)} touches sys.path at line(s) {uses}"


def test_core_modules_keep_to_one_concern_and_a_few_screens():
    """The bar of the layout review: no module of the library over 450 lines (vlm.py had reached 814)."""
    sizes = {
        path.relative_to(ROOT).as_posix(): len(path.read_text().splitlines())
        for path in (ROOT / "thinkdiff_core").rglob("*.py")
    }
    assert max(sizes.values()) < 450, sorted(sizes.items(), key=lambda item: -item[1])[:3]


def test_training_main_reads_on_one_screen_or_two():
    """train_aligner.main is set-up, loop and save, as nanoGPT's train.py; the parts live in their own modules."""
    tree = ast.parse((ROOT / "train" / "train_aligner.py").read_text())
    (main,) = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "main"]
    assert main.end_lineno - main.lineno + 1 < 80


def test_pip_install_outside_the_checkout_gives_the_library_and_console_scripts(tmp_path):
    """`pip install <checkout>` into a fresh venv: the library imports from another folder (from the venv, not the
    checkout) and the console scripts answer --help. The venv borrows this one's packages (torch and the rest) through
    a .pth line, so nothing is downloaded."""
    import shutil
    import site
    import subprocess
    import sys
    import venv

    # From a copy: building in the checkout would leave build/, whose stale files setuptools puts into later wheels.
    source = tmp_path / "source"
    shutil.copytree(
        ROOT,
        source,
        # what git ignores (the venv, runs, tiny data, caches) is not the package and can be large
        ignore=shutil.ignore_patterns(
            ".git", *(Path(line.strip("/")).name for line in (ROOT / ".gitignore").read_text().split())
        ),
    )
    venv.EnvBuilder(with_pip=False).create(tmp_path / "venv")
    python = tmp_path / "venv" / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(purelib, "borrowed.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    pip = [
        sys.executable,
        "-m",
        "pip",
        "--python",
        str(python),
        "install",
        "--quiet",
        "--no-deps",
        "--no-build-isolation",
    ]
    subprocess.run([*pip, str(source)], check=True, cwd=tmp_path, capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run(
        [
            python,
            "-c",
            "import thinkdiff_core, thinkdiff_train; print(thinkdiff_core.__file__); print(thinkdiff_train.__file__)",
        ],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert all(Path(path).is_relative_to(tmp_path / "venv") for path in where), where
    installed = Path(where[1]).parent
    assert (installed / "configs" / "tiny.yaml").is_file() and not (installed.parent / "nodes").exists()
    for script in (
        "thinkdiff",
        "thinkdiff-cobsat",
        "thinkdiff-train-aligner",
        "thinkdiff-extract-features",
        "thinkdiff-make-tiny-data",
    ):
        result = subprocess.run(
            [tmp_path / "venv" / "bin" / script, "--help"], cwd=elsewhere, capture_output=True, text=True
        )
        assert result.returncode == 0 and "usage:" in result.stdout, (script, result.stderr[-2000:])
    # the shipped configs are found by name wherever the package is installed
    probe = "from thinkdiff_train.config import load_config; print(load_config('tiny.yaml').variant)"
    assert (
        subprocess.run([python, "-c", probe], cwd=elsewhere, capture_output=True, text=True, check=True).stdout.strip()
        == "lvlm"
    )


def test_every_library_package_is_listed_for_installation():
    """pyproject lists the packages explicitly (train/ installs under another name), so a new subpackage that is not
    added there would be missing from `pip install .` without any error."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(path.parent.relative_to(ROOT).parts) for path in (ROOT / "thinkdiff_core").rglob("__init__.py")}
    found |= {
        "thinkdiff_train." + ".".join(p.parent.relative_to(ROOT / "train").parts)
        for p in (ROOT / "train").rglob("*/__init__.py")
    }
    assert found - listed == set(), f"add to [tool.setuptools] packages in pyproject.toml: {sorted(found - listed)}"


def test_nodes_warn_when_an_installed_core_shadows_the_packs_own(tmp_path):
    """A stale `pip install thinkdiff` in ComfyUI's Python would otherwise run silently under the pack's nodes."""
    import os
    import shutil
    import subprocess
    import sys

    shutil.copytree(ROOT / "thinkdiff_core", tmp_path / "site" / "thinkdiff_core")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(ROOT)])}
    probe = "import logging; logging.basicConfig(); import nodes"
    shadowed = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert (
        shadowed.returncode == 0
        and "not from this pack" in shadowed.stderr
        and "pip uninstall thinkdiff" in shadowed.stderr
    )
    env["PYTHONPATH"] = str(ROOT)
    own = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert own.returncode == 0 and "not from this pack" not in own.stderr, own.stderr[-2000:]


def test_pytest_collects_the_checkout_root_as_a_plain_folder(request):
    """The root conftest keeps pytest from importing the pack entry as a package (which fails in a clone whose folder
    name is not a Python name, such as mktemp's tmp.XXXX): the root is a plain folder in the collection tree."""
    import pytest

    root = request.node.listchain()[1]
    assert root.path == request.config.rootpath and type(root) is pytest.Dir, type(root)
