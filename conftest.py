"""pytest, at the checkout root: collect the root as a plain folder, not as a Python package.

The root's __init__.py is ComfyUI's entry to the pack. pytest would otherwise import it as a package to look for
setup_module: that fails in a folder whose name is not a Python name (a clone into mktemp's "tmp.XXXX"), and makes a
second copy of the node modules in one that is. tests/test_packaging.py loads the entry the way ComfyUI does instead.
"""

import pytest


class _RootAsPlainFolder:
    """A plugin rather than a hook of this conftest: pytest asks the folder *above* the root how to collect the root,
    and that folder's hooks leave this file's out."""

    @pytest.hookimpl(tryfirst=True)
    def pytest_collect_directory(self, path, parent):
        if path == parent.config.rootpath:
            return pytest.Dir.from_parent(parent, path=path)
        return None


def pytest_configure(config):
    config.pluginmanager.register(_RootAsPlainFolder(), "thinkdiff-root-as-plain-folder")
