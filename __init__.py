"""ComfyUI entry point of the ThinkDiff node pack: re-exports the node mappings, nothing else.

ComfyUI imports this folder as a package from custom_nodes/ without installing it, so the folder goes on sys.path
here for `thinkdiff_core` to import by its own name: the only sys.path edit in the project (elsewhere the checkout
is installed with `pip install -e .`). `nodes` is imported relatively: ComfyUI has a top-level `nodes` of its own.
"""

import os
import sys

_PACK_DIR = os.path.dirname(os.path.abspath(__file__))
if _PACK_DIR not in sys.path:
    sys.path.append(_PACK_DIR)

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
