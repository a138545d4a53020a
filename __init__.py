"""ComfyUI entry point of the ThinkDiff node pack: re-exports the node mappings, nothing else.

The pack folder goes on sys.path so that `thinkdiff_core` imports by its own name (ComfyUI imports this folder
as a package; `nodes` is imported relatively, since ComfyUI has a top-level `nodes` module of its own).
"""

import os
import sys

_PACK_DIR = os.path.dirname(os.path.abspath(__file__))
if _PACK_DIR not in sys.path:
    sys.path.append(_PACK_DIR)

if __package__:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:
    # Imported as a plain module rather than as the pack: pytest does that to a checkout whose folder name is not a
    # Python name (mktemp's "tmp.XXXX", say). There is no ComfyUI `nodes` module then, only the pack's own.
    from nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
