"""Referring expressions for synthetic scenes, generated so that each one names exactly one object.

Every expression is a small *query* (a JSON-ready dict) plus a sentence that says it. A query is
evaluated over the scene with three-valued logic: an object satisfies it clearly, clearly not,
or unclearly ("left of" when the two centres are almost aligned). An expression is kept for a
target only if the target is the one clear match and no object is unclear, so a viewer would not
hesitate either. ``evaluate`` is public so that tests (and anyone reading ``scenes.json``) can
re-check every stored sentence against the stored object attributes.

Geometry: boxes are float xyxy in continuous pixels (see ``shapes``); "centre" = box centre of the
visible mask; "full" areas are of the unoccluded shape.
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field

import numpy as np

from .figures import SHAPE_KINDS, SIZE_WORD, TEXTURE_ADJECTIVE

ATTRS = ("size", "colour", "texture", "kind")
MARGIN = 0.08          # fraction of the image side that separates "clearly" from "unclearly"
SIZE_RATIO = 1.4       # "the largest" needs this visible-area ratio over every other candidate
NEAR_RATIO = 1.5       # "closest to" needs the runner-up this much further away
CORNER_WORDS = {0: "no", 3: "three", 4: "four", 5: "five", 6: "six"}
ORDINALS = {2: "second", 3: "third", 4: "fourth"}


@dataclass(frozen=True)
class ObjectInfo:
    """What the expression generator knows about one object (``index`` = position in the scene)."""

    index: int
    kind: str
    colour: str
    size: str
    texture: str
    outline: str | None
    box: tuple[float, float, float, float]  # visible mask, xyxy
    area: int                               # visible pixels
    full_area: int                          # pixels of the unoccluded shape
    z: int                                  # paint order; higher is in front

    @property
    def cx(self) -> float:
        return (self.box[0] + self.box[2]) / 2

    @property
    def cy(self) -> float:
        return (self.box[1] + self.box[3]) / 2


@dataclass(frozen=True)
class SceneInfo:
    width: int
    height: int
    objects: tuple[ObjectInfo, ...]
    overlap: tuple[tuple[int, ...], ...]  # overlap[i][j] = pixels shared by the full masks
    # memo for ``select``: candidate generation asks the same attribute filter many times
    cache: dict = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True)
class Expression:
    raw: str            # as written
    sent: str           # lowercase, punctuation stripped
    tokens: tuple[str, ...]
    category: str       # attribute | position | relation | reasoning
    query: dict = field(hash=False, compare=False)


# ------------------------------------------------------------------------------- evaluation

def select(scene: SceneInfo, attrs: dict) -> list[int]:
    """Indices of the objects having all ``attrs`` (e.g. ``{"colour": "red", "kind": "circle"}``)."""
    key = tuple(sorted(attrs.items()))
    found = scene.cache.get(key)
    if found is None:
        found = scene.cache[key] = [o.index for o in scene.objects
                                    if all(getattr(o, k) == v for k, v in attrs.items())]
    return list(found)


def _unique(scene: SceneInfo, attrs: dict) -> int | None:
    found = select(scene, attrs)
    return found[0] if len(found) == 1 else None


def _band(c: float, dim: float) -> int | None:
    """Third of the image (0, 1, 2) that ``c`` falls in, None when too close to a border."""
    m = MARGIN * dim
    for k, edge in ((0, dim / 3), (1, 2 * dim / 3)):
        if abs(c - edge) < m:
            return None
        if c < edge:
            return k
    return 2


def _relation(scene: SceneInfo, rel: str, o: ObjectInfo, lm: ObjectInfo) -> bool | None:
    mx, my = MARGIN * scene.width / 2, MARGIN * scene.height / 2
    if rel == "left_of":
        return True if o.cx <= lm.box[0] - mx else (False if o.cx >= lm.cx else None)
    if rel == "right_of":
        return True if o.cx >= lm.box[2] + mx else (False if o.cx <= lm.cx else None)
    if rel == "above":
        return True if o.cy <= lm.box[1] - my else (False if o.cy >= lm.cy else None)
    if rel == "below":
        return True if o.cy >= lm.box[3] + my else (False if o.cy <= lm.cy else None)
    if rel in ("in_front_of", "behind"):
        front, back = (o, lm) if rel == "in_front_of" else (lm, o)
        shared = scene.overlap[front.index][back.index]
        if shared == 0 or front.z < back.z:
            return False
        return True if shared >= max(20, 0.05 * min(front.full_area, back.full_area)) else None
    raise ValueError(f"unknown relation {rel!r}")


def _winner(values: list[tuple[float, int]], margin: float) -> int | None:
    """Index with the smallest value, if it beats every other by ``margin``."""
    ranked = sorted(values)
    if len(ranked) < 2 or ranked[1][0] - ranked[0][0] < margin:
        return None
    return ranked[0][1]


def evaluate(query: dict, scene: SceneInfo) -> tuple[set[int], set[int]]:
    """(objects that clearly match, objects that match unclearly)."""
    op = query["op"]
    objs = scene.objects
    cand = select(scene, query.get("attrs", {}))
    if op == "attr":
        return set(cand), set()
    if op == "corners":
        return {o.index for o in objs if SHAPE_KINDS[o.kind].corners == query["n"]}, set()
    if op == "hole":
        return {o.index for o in objs if SHAPE_KINDS[o.kind].has_hole}, set()
    if op == "not_colour":
        if not any(objs[i].colour == query["colour"] for i in cand):
            return set(), set()
        return {i for i in cand if objs[i].colour != query["colour"]}, set()

    pick: int | None = None
    if op == "extreme":
        ax, sign = query["axis"], (1 if query["dir"] == "min" else -1)
        dim = scene.width if ax == "x" else scene.height
        centre = [(sign * (objs[i].cx if ax == "x" else objs[i].cy), i) for i in cand]
        k = (0 if ax == "x" else 1) + (0 if sign == 1 else 2)  # leading box edge
        edge = [(sign * objs[i].box[k], i) for i in cand]
        pick = _winner(centre, MARGIN * dim)
        if pick is not None and _winner(edge, 1.0) != pick:  # its leading edge too
            pick = None
    elif op == "ordinal":
        ax, sign, k = query["axis"], (1 if query["dir"] == "min" else -1), query["k"]
        dim = scene.width if ax == "x" else scene.height
        ranked = sorted((sign * (objs[i].cx if ax == "x" else objs[i].cy), i) for i in cand)
        if len(ranked) >= k:
            gaps = [ranked[j + 1][0] - ranked[j][0] for j in range(min(k, len(ranked) - 1))]
            pick = ranked[k - 1][1] if min(gaps) >= MARGIN * dim else None
    elif op == "size_extreme":
        sign = 1 if query["dir"] == "smallest" else -1
        vis = _winner([(sign * np.log(objs[i].area), i) for i in cand], np.log(SIZE_RATIO))
        full = _winner([(sign * np.log(objs[i].full_area), i) for i in cand], np.log(1.25))
        pick = vis if vis == full else None
    elif op == "closest":
        lm = _unique(scene, query["landmark"])
        if lm is None:
            return set(), set()
        others = [i for i in cand if i != lm]
        d = sorted((np.hypot(objs[i].cx - objs[lm].cx, objs[i].cy - objs[lm].cy), i) for i in others)
        if len(d) >= 2 and d[1][0] >= NEAR_RATIO * max(d[0][0], 1.0):
            pick = d[0][1]
    elif op == "same_colour":
        lm = _unique(scene, query["landmark"])
        if lm is None:
            return set(), set()
        return {i for i in cand if i != lm and objs[i].colour == objs[lm].colour}, set()
    elif op in ("cell", "relation"):
        clear, unclear = set(), set()
        lm = _unique(scene, query["landmark"]) if op == "relation" else None
        if op == "relation" and lm is None:
            return set(), set()
        for i in cand:
            if op == "cell":
                tx, ty = query["cell"]
                bx, by = _band(objs[i].cx, scene.width), _band(objs[i].cy, scene.height)
                if (bx is not None and bx != tx) or (by is not None and by != ty):
                    continue
                verdict = True if (bx, by) == (tx, ty) else None
            else:
                if i == lm:
                    continue
                verdict = _relation(scene, query["rel"], objs[i], objs[lm])
            if verdict:
                clear.add(i)
            elif verdict is None:
                unclear.add(i)
        return clear, unclear
    else:
        raise ValueError(f"unknown query op {op!r}")
    return ({pick}, set()) if pick is not None else (set(), set(cand))


def names_exactly(query: dict, scene: SceneInfo, index: int) -> bool:
    clear, unclear = evaluate(query, scene)
    return clear == {index} and not unclear


# ------------------------------------------------------------------------------- wording

def noun_phrase(attrs: dict, plural: bool = False, noun: str | None = None) -> str:
    words = []
    if "size" in attrs:
        words.append(SIZE_WORD[attrs["size"]])
    if "colour" in attrs:
        words.append(attrs["colour"])
    if "texture" in attrs:
        words.append(TEXTURE_ADJECTIVE[attrs["texture"]])
    if "kind" in attrs:
        kind = SHAPE_KINDS[attrs["kind"]]
        words.append(kind.plural if plural else kind.name)
    else:
        words.append(noun or ("shapes" if plural else "shape"))
    return " ".join(words)


_REL_WORDS = {
    "left_of": ("left of", "to the left of"), "right_of": ("right of", "to the right of"),
    "above": ("above",), "below": ("below", "beneath", "under"),
    "in_front_of": ("on top of", "in front of", "covering"), "behind": ("behind", "partly hidden by"),
}
_EXTREME_WORDS = {
    ("x", "min"): ("the leftmost {n}", "the {n} on the far left", "the {n} furthest to the left"),
    ("x", "max"): ("the rightmost {n}", "the {n} on the far right", "the {n} furthest to the right"),
    ("y", "min"): ("the topmost {n}", "the highest {n}", "the {n} at the very top"),
    ("y", "max"): ("the lowest {n}", "the bottommost {n}", "the {n} closest to the bottom"),
}
_PAIR_WORDS = {("x", "min"): ("the left {n}", "the {n} on the left"),
               ("x", "max"): ("the right {n}", "the {n} on the right"),
               ("y", "min"): ("the upper {n}", "the top {n}"),
               ("y", "max"): ("the lower {n}", "the bottom {n}")}
_SIDE = {("x", "min"): "left", ("x", "max"): "right", ("y", "min"): "top", ("y", "max"): "bottom"}
_CELLS = {(0, 0): "top left", (2, 0): "top right", (0, 2): "bottom left", (2, 2): "bottom right",
          (1, 1): "centre"}


# Landmark wordings in order of preference: the ones a person would reach for first.
_LANDMARK_ORDER = (("kind",), ("colour",), ("colour", "kind"), ("size", "kind"), ("texture", "kind"),
                   ("size", "colour", "kind"), ("colour", "texture", "kind"), ("size",),
                   ("size", "colour"), ("colour", "texture"), ("texture",),
                   ("size", "texture", "kind"), ("size", "colour", "texture", "kind"))


def _landmark_attrs(scene: SceneInfo, index: int, exclude: tuple[str, ...] = ()) -> dict | None:
    """The most natural attribute set that names object ``index`` alone."""
    o = scene.objects[index]
    for subset in _LANDMARK_ORDER:
        if any(a in exclude for a in subset):
            continue
        attrs = {a: getattr(o, a) for a in subset}
        if _unique(scene, attrs) == index:
            return attrs
    return None


def _say(query: dict, scene: SceneInfo, rng: np.random.Generator) -> str:
    """One sentence for a query, phrasing drawn from ``rng``."""
    def pick(options):
        return options[int(rng.integers(len(options)))]

    op, attrs = query["op"], query.get("attrs", {})
    n = noun_phrase(attrs)
    size = len(select(scene, attrs))
    if op == "attr":
        options = ["the {n}", "{n}", "the {n} in the image"]
        if "kind" not in attrs:
            options += ["the " + noun_phrase(attrs, noun="one"), "the " + noun_phrase(attrs, noun="object")]
        elif "colour" in attrs and len(attrs) == 2:
            options.append(f"the {attrs['kind']} that is {attrs['colour']}")
        return pick(options).format(n=n)
    if op == "extreme":
        key = (query["axis"], query["dir"])
        return pick(_PAIR_WORDS[key] if size == 2 and rng.random() < 0.6 else _EXTREME_WORDS[key]).format(n=n)
    if op == "ordinal":
        return f"the {ORDINALS[query['k']]} {n} from the {_SIDE[(query['axis'], query['dir'])]}"
    if op == "cell":
        where = _CELLS[tuple(query["cell"])]
        if where == "centre":
            return pick(["the {n} in the middle", "the {n} in the centre of the image"]).format(n=n)
        return pick(["the {n} at the " + where, "the {n} in the " + where + " corner",
                     "the " + where + " {n}"]).format(n=n)
    if op == "relation":
        lm = "the " + noun_phrase(query["landmark"])
        return f"the {n} {pick(_REL_WORDS[query['rel']])} {lm}"
    if op == "closest":
        lm = "the " + noun_phrase(query["landmark"])
        return pick([f"the {n} closest to {lm}", f"the {n} nearest to {lm}", f"the {n} next to {lm}"])
    if op == "size_extreme":
        big = query["dir"] == "largest"
        if size == 2:
            return pick(["the larger {n}", "the bigger {n}"] if big else ["the smaller {n}"]).format(n=n)
        return pick(["the largest {n}", "the biggest {n}"] if big
                    else ["the smallest {n}", "the tiniest {n}"]).format(n=n)
    if op == "same_colour":
        lm = "the " + noun_phrase(query["landmark"])
        return pick([f"the {n} with the same colour as {lm}", f"the {n} that has the same colour as {lm}",
                     f"the {n} coloured like {lm}"])
    if op == "not_colour":
        c = query["colour"]
        return pick([f"the {n} that is not {c}", f"the {n} which isn't {c}", f"the non-{c} {n}"])
    if op == "corners":
        k = query["n"]
        if k == 0:
            return pick(["the shape with no corners", "the shape without corners", "the round shape"])
        return pick([f"the shape with {CORNER_WORDS[k]} corners", f"the shape that has {k} corners"])
    if op == "hole":
        return pick(["the shape with a hole", "the shape with a hole in the middle"])
    raise ValueError(op)


def normalise(raw: str) -> tuple[str, tuple[str, ...]]:
    """RefCOCO-style ``sent`` (lowercase words joined by spaces) and its tokens."""
    tokens = tuple(re.findall(r"[a-z0-9]+(?:[-'][a-z0-9]+)*", raw.lower()))
    return " ".join(tokens), tokens


# ------------------------------------------------------------------------------- generation

_BASES = ((), ("kind",), ("colour",), ("colour", "kind"))


def candidate_queries(scene: SceneInfo, index: int) -> list[tuple[str, dict]]:
    """Every (category, query) that names object ``index`` alone in ``scene``."""
    o = scene.objects[index]
    out: list[tuple[str, dict]] = []

    def keep(category: str, query: dict) -> None:
        if names_exactly(query, scene, index):
            out.append((category, query))

    for n in range(1, 5):
        for s in itertools.combinations(ATTRS, n):
            keep("attribute", {"op": "attr", "attrs": {a: getattr(o, a) for a in s}})
    landmarks = {j: _landmark_attrs(scene, j) for j in range(len(scene.objects)) if j != index}
    for base in _BASES:
        attrs = {a: getattr(o, a) for a in base}
        crowd = len(select(scene, attrs))
        if crowd >= 2:
            for axis, d in itertools.product("xy", ("min", "max")):
                keep("position", {"op": "extreme", "attrs": attrs, "axis": axis, "dir": d})
                for k in ORDINALS:
                    if crowd > k:
                        keep("position", {"op": "ordinal", "attrs": attrs, "axis": axis, "dir": d, "k": k})
            for cell in _CELLS:
                keep("position", {"op": "cell", "attrs": attrs, "cell": list(cell)})
            for d in ("largest", "smallest"):
                keep("reasoning", {"op": "size_extreme", "attrs": attrs, "dir": d})
        if "colour" in base:
            continue  # relations below read better with a kind or bare "shape"
        for j, lm_attrs in landmarks.items():
            if lm_attrs is None:
                continue
            for rel in _REL_WORDS:
                keep("relation", {"op": "relation", "attrs": attrs, "rel": rel, "landmark": lm_attrs})
            keep("relation", {"op": "closest", "attrs": attrs, "landmark": lm_attrs})
            if scene.objects[j].colour == o.colour:
                lm_plain = _landmark_attrs(scene, j, exclude=("colour",))
                if lm_plain is not None:
                    keep("reasoning", {"op": "same_colour", "attrs": attrs, "landmark": lm_plain})
    kind_set = select(scene, {"kind": o.kind})
    for c in sorted({scene.objects[i].colour for i in kind_set} - {o.colour}):  # sorted: str hashes vary
        keep("reasoning", {"op": "not_colour", "attrs": {"kind": o.kind}, "colour": c})
    corners = SHAPE_KINDS[o.kind].corners
    if corners in CORNER_WORDS:
        keep("reasoning", {"op": "corners", "n": corners})
    if SHAPE_KINDS[o.kind].has_hole:
        keep("reasoning", {"op": "hole"})
    return out


def _finish(raw: str, rng: np.random.Generator) -> str:
    # RefCOCO's raw sentences are typed by people: some capitalised, some with a full stop.
    if rng.random() < 0.25:
        raw = raw[0].upper() + raw[1:]
    if rng.random() < 0.15:
        raw += "."
    return raw


_CATEGORY_WEIGHT = {"attribute": 0.35, "position": 0.25, "relation": 0.2, "reasoning": 0.2}


def describe(scene: SceneInfo, rng: np.random.Generator, max_per_object: int = 3
             ) -> dict[int, list[Expression]]:
    """Up to ``max_per_object`` expressions per object, each from a different category where
    possible. Objects with no unambiguous expression are left out."""
    result: dict[int, list[Expression]] = {}
    for o in scene.objects:
        by_cat: dict[str, list[dict]] = {}
        for cat, q in candidate_queries(scene, o.index):
            by_cat.setdefault(cat, []).append(q)
        if not by_cat:
            continue
        want = int(rng.integers(1, max_per_object + 1))
        # Categories without replacement, weighted so that plain attribute phrases stay common.
        cats = [c for c in _CATEGORY_WEIGHT if c in by_cat]
        w = np.array([_CATEGORY_WEIGHT[c] for c in cats])
        cats = [cats[i] for i in rng.choice(len(cats), size=len(cats), replace=False, p=w / w.sum())]
        chosen: list[Expression] = []
        seen: set[str] = set()
        for attempt in range(want * 3):
            if len(chosen) == want:
                break
            cat = cats[attempt % len(cats)]
            q = by_cat[cat][int(rng.integers(len(by_cat[cat])))]
            raw = _say(q, scene, rng)
            sent, tokens = normalise(raw)
            if sent in seen:
                continue
            seen.add(sent)
            chosen.append(Expression(_finish(raw, rng), sent, tokens, cat, q))
        result[o.index] = chosen
    return result


def multi_target(scene: SceneInfo, rng: np.random.Generator, limit: int = 2
                 ) -> list[tuple[str, list[int]]]:
    """("all red shapes", [indices]) for attribute groups of two or more objects."""
    options: list[tuple[str, list[int]]] = []
    seen: set[tuple] = set()
    for o in scene.objects:
        for base in (("colour",), ("kind",), ("texture",), ("colour", "kind")):
            attrs = {a: getattr(o, a) for a in base}
            if attrs.get("texture") == "solid":
                continue
            members = select(scene, attrs)
            key = tuple(sorted(attrs.items()))
            if len(members) < 2 or key in seen:
                continue
            seen.add(key)
            plural = noun_phrase(attrs, plural=True)
            forms = [f"all {plural}", f"all the {plural}", f"every {noun_phrase(attrs)}"]
            if len(members) == 2:
                forms.append(f"both {plural}")
            options.append((forms[int(rng.integers(len(forms)))], members))
    if len(scene.objects) >= 2 and rng.random() < 0.15:
        options.append(("every shape in the image", [o.index for o in scene.objects]))
    order = rng.permutation(len(options))[:limit]
    return [options[i] for i in order]


def no_target(scene: SceneInfo, rng: np.random.Generator, colours: list[str]) -> str | None:
    """A phrase that names nothing in the scene, preferably a near miss (its colour or its kind
    is present, just not together)."""
    present_c = {o.colour for o in scene.objects}
    present_k = {o.kind for o in scene.objects}
    near, far = [], []
    for c, k in itertools.product(colours, SHAPE_KINDS):
        if not select(scene, {"colour": c, "kind": k}):
            (near if (c in present_c or k in present_k) else far).append(f"the {c} {k}")
    for k in SHAPE_KINDS:
        if k not in present_k:
            far.append(f"the {k}")
    if not any(SHAPE_KINDS[k].has_hole for k in present_k):
        far.append("the shape with a hole")
    pool = near if near and rng.random() < 0.8 else (far or near)
    return pool[int(rng.integers(len(pool)))] if pool else None


def region_description(o: ObjectInfo) -> str:
    """Full description of one object, e.g. "a large red striped circle with a black outline"."""
    words = [SIZE_WORD[o.size], o.colour]
    if o.texture != "solid":
        words.append(TEXTURE_ADJECTIVE[o.texture])
    words.append(o.kind)
    text = ("an " if words[0][0] in "aeiou" else "a ") + " ".join(words)
    return text + (f" with a {o.outline} outline" if o.outline else "")
