"""The colours regionwatch draws with, in one place, so that TensorBoard and the report agree.

Plain names and RGB tuples (no plotting import): tensorboard.py and report/ both read them.
"""

from __future__ import annotations

from types import MappingProxyType

# method.md §5: the anchor dots A, B, C of a region map are filled with their own channel at 1 and
# the others at 0.5, and edged with their own channel at 0.5 and the others at 0.
ANCHOR_FILL = ((1.0, 0.5, 0.5), (0.5, 1.0, 0.5), (0.5, 0.5, 1.0))
ANCHOR_EDGE = ((0.5, 0.0, 0.0), (0.0, 0.5, 0.0), (0.0, 0.0, 0.5))
# One colour per pair set, the same in every figure (matplotlib colour names).
PAIR_COLOURS = MappingProxyType(
    {"random": "tab:green", "similar": "tab:blue", "dissimilar": "tab:orange"}
)
