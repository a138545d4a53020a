"""pytest, at the checkout root: collect the root as a plain folder, not as a Python package.

The root's __init__.py is ComfyUI's entry to the pack. pytest would otherwise import it as a package of the
folder's own name to look for setup_module: that fails in a folder whose name is not a Python name (a clone into
mktemp's "tmp.XXXX") and makes a second copy of the node modules in one that is. tests/test_packaging.py loads
the entry the way ComfyUI does instead.
"""

import pytest


@pytest.hookimpl(tryfirst=True)
def pytest_collect_directory(path, parent):
    if path == parent.config.rootpath:
        return pytest.Dir.from_parent(parent, path=path)
    return None
