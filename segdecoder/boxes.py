"""Box helpers for masks. Boxes are float pixel ``(x1, y1, x2, y2)`` in continuous coordinates:
pixel column ``c`` covers ``[c, c + 1)``, so a mask occupying columns 3..5 has ``x1 = 3``, ``x2 = 6``.

Kept apart from ``segdecoder.masks`` (which imports ``segdecoder.zoom``, itself a user of
:func:`box_from_mask`) so that importing it makes no cycle; ``grounding.result`` re-exports it."""
from __future__ import annotations

import numpy as np

Box = tuple[float, float, float, float]


def box_from_mask(mask: np.ndarray) -> Box | None:
    """Tight ``(x1, y1, x2, y2)`` box of the nonzero pixels of an ``H x W`` mask, in continuous
    pixel coordinates (``x2`` = last column + 1, ``y2`` = last row + 1); ``None`` if empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return (float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1))


__all__ = ["Box", "box_from_mask"]
