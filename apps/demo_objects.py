"""The objects a user builds with clicks in the web app: each with its own clicks, box, mask and colour, plus
undo / redo over the whole list.

Coordinates: every point and box here is in the pixels of the image as uploaded (``x`` right, ``y`` down, boxes
``(x1, y1, x2, y2)``): the API's and the downloads' frame. Masks live at the *view* size: a big image is segmented
on a copy scaled to :data:`VIEW_MAX_SIDE` (the decoder reads 256-1024 px whatever the upload's size; what costs
seconds on a 12-megapixel image is upscaling, refining, drawing and PNG-encoding masks at full size), and scaled
up to the image's size only for the downloads (:func:`full_size_mask`).

An :class:`Objects` value is immutable: every edit returns a new one whose ``history`` holds the old states, so
undo and redo restore masks instantly (no decoder call) and a failed action leaves the stored value untouched.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import cv2
import numpy as np

from apps.overlay import PALETTE, contrasting_colour
from grounding.errors import PromptError

VIEW_MAX_SIDE = 1024      # longest side of the image the app segments and shows (bigger uploads are scaled down)
HISTORY_LIMIT = 50        # undo steps kept


@dataclass(frozen=True)
class ClickObject:
    """One object: its clicks (image pixels, label 1 object / 0 background), its box, and the mask those gave
    (view size, bool) with the decoder's score; ``prompt_key`` is the prompt the mask belongs to (a mask is stale
    when the prompt has changed since). ``colour``: index into PALETTE (None until its first mask); ``name``: an
    answer's phrase, or None for clicked objects."""

    points: tuple[tuple[float, float], ...] = ()
    labels: tuple[int, ...] = ()
    box: tuple[float, float, float, float] | None = None
    mask: np.ndarray | None = field(default=None, compare=False)
    score: float | None = None
    prompt_key: tuple | None = None
    colour: int | None = None
    name: str | None = None

    @property
    def key(self) -> tuple:
        return (self.points, self.labels, self.box)

    @property
    def has_prompt(self) -> bool:
        return bool(self.points) or self.box is not None

    @property
    def stale(self) -> bool:
        """Its clicks / box changed since its mask was made (an answer's mask, with no prompt, never is)."""
        return self.has_prompt and self.prompt_key != self.key

    @property
    def area(self) -> int:
        return 0 if self.mask is None else int(self.mask.sum())

    def prompt_text(self) -> str:
        pos = sum(1 for v in self.labels if v == 1)
        neg = len(self.labels) - pos
        parts = ([f"{pos} object point{'s' * (pos != 1)}"] if pos else []) + (
            [f"{neg} background point{'s' * (neg != 1)}"] if neg else []) + (["1 box"] if self.box else [])
        return " and ".join(parts) or "no prompt"


@dataclass(frozen=True)
class Objects:
    """The object list, which one clicks go to (``active``), and the undo / redo stacks of earlier states."""

    items: tuple[ClickObject, ...] = (ClickObject(),)
    active: int = 0
    history: tuple["Objects", ...] = ()
    future: tuple["Objects", ...] = ()

    # ---- edits (each returns a new value, undoable) ---------------------------------------------------
    def _edit(self, items, active: int | None = None) -> "Objects":
        past = (self._bare(),) + self.history[:HISTORY_LIMIT - 1]
        return Objects(tuple(items), self.active if active is None else active, past, ())

    def _bare(self) -> "Objects":
        return dataclasses.replace(self, history=(), future=())

    @property
    def current(self) -> ClickObject:
        return self.items[self.active]

    def add_click(self, x: float, y: float, label: int) -> "Objects":
        obj = self.current
        changed = dataclasses.replace(obj, points=obj.points + ((float(x), float(y)),), labels=obj.labels + (int(label),))
        return self._edit(self._replaced(changed))

    def set_box(self, box: tuple[float, float, float, float] | None) -> "Objects":
        return self._edit(self._replaced(dataclasses.replace(self.current, box=box)))

    def new_object(self) -> "Objects":
        """Start a new object (the current one stays as it is); an empty current object is reused."""
        if not self.current.has_prompt and self.current.mask is None:
            return self
        return self._edit(self.items + (ClickObject(),), active=len(self.items))

    def select(self, index: int) -> "Objects":
        if not 0 <= index < len(self.items):
            raise PromptError(f"there is no object {index + 1}: there are {len(self.items)}")
        return dataclasses.replace(self, active=index)  # choosing is not an edit: nothing to undo

    def clear_current(self) -> "Objects":
        """Drop the current object (an empty list keeps one empty object to click on)."""
        items = self.items[:self.active] + self.items[self.active + 1:]
        if not items:
            items = (ClickObject(),)
        return self._edit(items, active=min(self.active, len(items) - 1))

    def clear_all(self) -> "Objects":
        return self._edit((ClickObject(),), active=0)

    def with_answer(self, masks: list[tuple[str | None, tuple | None, np.ndarray | None, float | None]]) -> "Objects":
        """An answer's targets become the objects (name, box, mask, score each; target i gets palette colour i,
        the colour of its phrase), plus an empty one for new clicks."""
        items = tuple(ClickObject(box=None, mask=m, score=s, colour=i % len(PALETTE), name=n or "mask")
                      for i, (n, _, m, s) in enumerate(masks))
        return self._edit(items + (ClickObject(),), active=len(items))

    def _replaced(self, obj: ClickObject) -> tuple[ClickObject, ...]:
        return self.items[:self.active] + (obj,) + self.items[self.active + 1:]

    # ---- results (not edits: the mask a prompt gives belongs to the state that asked for it) --------------
    def with_mask(self, index: int, mask: np.ndarray | None, score: float | None, key: tuple,
                  pixels: np.ndarray) -> "Objects":
        """Object ``index``'s new mask for the prompt ``key`` (its colour is chosen on its first mask: the palette
        colour farthest from the object's own colour among those not used by the other objects). The undo
        history is untouched; only a mask whose key is still the object's prompt is stored."""
        obj = self.items[index]
        if obj.key != key:
            return self
        colour = obj.colour
        if colour is None and mask is not None and mask.any():
            colour = contrasting_colour(pixels, mask, [o.colour for o in self.items if o.colour is not None])
        items = list(self.items)
        items[index] = dataclasses.replace(obj, mask=mask, score=score, prompt_key=key, colour=colour)
        return dataclasses.replace(self, items=tuple(items))

    # ---- undo / redo ---------------------------------------------------------------------------------
    def undo(self) -> "Objects":
        if not self.history:
            raise PromptError("nothing to undo")
        previous = self.history[0]
        return Objects(previous.items, previous.active, self.history[1:], (self._bare(),) + self.future)

    def redo(self) -> "Objects":
        if not self.future:
            raise PromptError("nothing to redo")
        following = self.future[0]
        return Objects(following.items, following.active, (self._bare(),) + self.history, self.future[1:])

    # ---- views ---------------------------------------------------------------------------------------
    @property
    def with_masks(self) -> list[int]:
        return [i for i, o in enumerate(self.items) if o.mask is not None and o.mask.any()]

    def label(self, index: int) -> str:
        """``"2: cat · 3 clicks + box · 7,916 px"``: the object list's line for object ``index``."""
        obj = self.items[index]
        parts = [f"{index + 1}: {obj.name or 'object'}"]
        if obj.has_prompt:
            parts.append(obj.prompt_text())
        parts.append("no mask yet" if obj.mask is None else f"{obj.area:,} px")
        return " · ".join(parts)


def colour_of(obj: ClickObject, index: int) -> tuple[int, int, int]:
    return PALETTE[(obj.colour if obj.colour is not None else index) % len(PALETTE)]


def view_size(height: int, width: int, max_side: int = VIEW_MAX_SIDE) -> tuple[int, int]:
    """(H, W) of the view of an image of ``height x width``: scaled down to ``max_side`` on its longer side."""
    scale = min(1.0, max_side / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def scaled_view(pixels: np.ndarray, max_side: int = VIEW_MAX_SIDE) -> np.ndarray:
    """The image the app segments and shows: ``pixels`` itself when small enough, else scaled down (area)."""
    h, w = view_size(*pixels.shape[:2], max_side)
    if (h, w) == pixels.shape[:2]:
        return pixels
    return cv2.resize(pixels, (w, h), interpolation=cv2.INTER_AREA)


def full_size_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A view-size bool mask at the image's ``size`` (H, W): linear upscaling of 0/255 cut at half, so edges
    stay smooth instead of blocky."""
    if mask.shape == tuple(size):
        return mask
    up = cv2.resize(mask.astype(np.uint8) * 255, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
    return up >= 128
