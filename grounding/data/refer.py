"""Loader for REFER-format datasets: RefCOCO, RefCOCO+, RefCOCOg and the synthetic sets.

Folder layouts accepted (``data_root`` is what the user passes):

* real REFER layout::

      data_root/refcoco/instances.json
      data_root/refcoco/refs(unc).p            (refs(umd).p / refs(google).p for refcocog)
      data_root/images/train2014/COCO_train2014_000000xxxxxx.jpg
      # or, as LISA lays it out (data_root = .../refer_seg):
      data_root/images/mscoco/images/train2014/COCO_train2014_000000xxxxxx.jpg

* synthetic layout (``shapes.scenes.synthetic``): ``data_root`` itself holds ``instances.json``,
  ``refs(unc).p`` and ``images/``; the dataset name is then the folder's name.

Conventions: boxes are float ``(x1, y1, x2, y2)`` in continuous pixels of the original image
(COCO ``bbox`` ``[x, y, w, h]`` -> ``(x, y, x + w, y + h)``, no +1); masks are ``bool`` ``H x W``
arrays decoded by pycocotools from the annotation's polygons (``frPyObjects`` + ``merge``) or RLE.
Sentence text is the ref's ``sent`` field (lowercase, as the REC/RES evaluations use it).
"""
from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from ..errors import DatasetError

_REF_KEYS = ("ref_id", "ann_id", "image_id", "category_id", "split", "sentences")


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler for REFER ``refs(*).p`` files that refuses to import anything.

    Unpickling can run arbitrary code: a pickle names a callable by module and attribute
    (``os.system``, ``builtins.eval``...) and the unpickler calls it while loading. Every such
    lookup goes through ``find_class`` (``GLOBAL``, ``STACK_GLOBAL``, ``INST``, ``OBJ`` and the
    extension-registry opcodes alike). The REFER files only hold dicts, lists, strings, ints,
    floats, bools and None, which the unpickler builds from opcodes without any lookup, so
    refusing every lookup loses nothing and makes a crafted file harmless.
    """

    def __init__(self, file, *, encoding: str = "utf-8", errors: str = "replace"):
        # The original files were written by Python 2, whose byte strings need a decoding;
        # utf-8 covers the ASCII of RefCOCO and the odd accented word of RefCOCOg.
        super().__init__(file, encoding=encoding, errors=errors)

    def find_class(self, module: str, name: str):  # noqa: D401 - pickle API
        raise DatasetError(
            f"refusing to load {module}.{name}: REFER pickles may hold only plain containers "
            "and scalars (this file could run code)")


def load_refs_pickle(path: str | Path) -> list[dict]:
    """Read a REFER ``refs(*).p`` file safely; ``DatasetError`` names the file on any problem."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"REFER refs file not found: {path}")
    try:
        with open(path, "rb") as f:
            refs = RestrictedUnpickler(f).load()
    except DatasetError as err:
        raise DatasetError(f"{path}: {err}") from None
    except Exception as err:  # a truncated or foreign file can fail in many pickle-internal ways
        raise DatasetError(f"{path} is not a readable REFER pickle ({type(err).__name__}: {err})") from None
    if not isinstance(refs, list) or not all(isinstance(r, dict) for r in refs):
        raise DatasetError(f"{path} does not hold a list of ref dicts")
    for r in refs:
        missing = [k for k in _REF_KEYS if k not in r]
        if missing:
            raise DatasetError(f"{path}: ref {r.get('ref_id')!r} lacks {missing}")
    return refs


@dataclass(frozen=True)
class Sentence:
    """One referring sentence; REC and RES are scored per sentence."""

    ref_id: int
    sent_id: int
    image_id: int
    ann_id: int
    text: str
    category_id: int
    split: str
    tokens: tuple[str, ...]


@dataclass(frozen=True)
class Ref:
    """One referred object (an annotation) with its sentences."""

    ref_id: int
    ann_id: int
    image_id: int
    category_id: int
    split: str
    sentences: tuple[Sentence, ...]

    @property
    def sent_ids(self) -> tuple[int, ...]:
        return tuple(s.sent_id for s in self.sentences)


class ReferDataset:
    """A REFER dataset (``dataset`` x ``split_by``) with its COCO annotations and images.

    ``image_root`` overrides the image folder; otherwise the folder is found by probing the
    usual places (see the module docstring) the first time an image path is asked for.
    """

    def __init__(self, data_root: str | Path, dataset: str = "refcoco", split_by: str = "unc",
                 image_root: str | Path | None = None):
        self.data_root = Path(data_root)
        tried = [self.data_root / dataset / "instances.json", self.data_root / "instances.json"]
        found = next((p for p in tried if p.is_file()), None)
        if found is None:
            raise DatasetError("REFER instances.json not found; looked at " + ", ".join(map(str, tried)))
        self.ann_dir = found.parent
        self.dataset = dataset if found == tried[0] else self.data_root.resolve().name
        self.split_by = split_by
        self.refs_path = self.ann_dir / f"refs({split_by}).p"
        self.instances_path = found
        raw_refs = load_refs_pickle(self.refs_path)
        self._load_instances(found)

        self._refs: list[Ref] = []
        for r in raw_refs:
            if r["ann_id"] not in self._anns or r["image_id"] not in self._images:
                raise DatasetError(f"{self.refs_path}: ref {r['ref_id']} points at annotation "
                                   f"{r['ann_id']} / image {r['image_id']} missing from {found}")
            sents = tuple(
                Sentence(ref_id=r["ref_id"], sent_id=s["sent_id"], image_id=r["image_id"],
                         ann_id=r["ann_id"], text=s.get("sent") or s.get("raw", ""),
                         category_id=r["category_id"], split=r["split"],
                         tokens=tuple(s.get("tokens") or ()))
                for s in r["sentences"])
            self._refs.append(Ref(r["ref_id"], r["ann_id"], r["image_id"], r["category_id"],
                                  r["split"], sents))
        self._explicit_image_root = Path(image_root) if image_root is not None else None
        self._image_root: Path | None = None

    def _load_instances(self, path: Path) -> None:
        # Plain json instead of pycocotools.COCO: it prints to stdout and indexes more than we need.
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            self._images = {int(i["id"]): i for i in data["images"]}
            self._anns = {int(a["id"]): a for a in data["annotations"]}
            self.categories = {int(c["id"]): c["name"] for c in data.get("categories", [])}
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise DatasetError(f"{path} is not a readable COCO instances file ({type(err).__name__}: {err})") from None

    # ------------------------------------------------------------------ queries

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(sorted({r.split for r in self._refs}))

    def refs(self, split: str | None = None) -> list[Ref]:
        """Refs of ``split`` (all when None), in file order. Unknown split -> ``DatasetError``."""
        if split is None:
            return list(self._refs)
        if split not in self.splits:
            raise DatasetError(f"split {split!r} not in {self.refs_path}; it has {list(self.splits)}")
        return [r for r in self._refs if r.split == split]

    def sentences(self, split: str | None = None) -> list[Sentence]:
        return [s for r in self.refs(split) for s in r.sentences]

    def images(self, split: str | None = None) -> list[int]:
        """Sorted ids of the images that have refs in ``split``."""
        return sorted({r.image_id for r in self.refs(split)})

    def sentences_by_image(self, split: str | None = None) -> dict[int, list[Sentence]]:
        out: dict[int, list[Sentence]] = {}
        for s in self.sentences(split):
            out.setdefault(s.image_id, []).append(s)
        return out

    def annotations_by_image(self) -> dict[int, list[int]]:
        """image id -> ids of all its annotations in instances.json (referred to or not), in file order."""
        out: dict[int, list[int]] = {}
        for ann_id, ann in self._anns.items():
            out.setdefault(int(ann["image_id"]), []).append(ann_id)
        return out

    def category_name(self, ann_id: int) -> str:
        return self.categories[int(self._ann(ann_id)["category_id"])]

    def image_size(self, image_id: int) -> tuple[int, int]:
        """(height, width) from instances.json."""
        info = self._image_info(image_id)
        return int(info["height"]), int(info["width"])

    def _image_info(self, image_id: int) -> dict:
        try:
            return self._images[int(image_id)]
        except KeyError:
            raise DatasetError(f"image id {image_id} not in {self.instances_path}") from None

    def _ann(self, ann_id: int) -> dict:
        try:
            return self._anns[int(ann_id)]
        except KeyError:
            raise DatasetError(f"annotation id {ann_id} not in {self.instances_path}") from None

    # ------------------------------------------------------------------ images

    def image_root_candidates(self) -> list[Path]:
        root = self.data_root
        cands = [self.ann_dir / "images", root / "images" / "train2014",
                 root / "images" / "mscoco" / "images" / "train2014", root / "train2014",
                 root / "images", root / "images" / "saiapr_tc-12"]
        return list(dict.fromkeys(cands))

    @property
    def image_root(self) -> Path:
        if self._image_root is None:
            self._image_root = self._find_image_root()
        return self._image_root

    def _find_image_root(self) -> Path:
        if self._explicit_image_root is not None:
            if not self._explicit_image_root.is_dir():
                raise DatasetError(f"image folder not found: {self._explicit_image_root}")
            return self._explicit_image_root
        # The file name comes from instances.json (the ref's own file_name carries an annotation
        # suffix in RefCOCO); a folder qualifies when it holds one of a few images taken from
        # every split (someone may have copied only the val/test images).
        probe_ids: list[int] = []
        for split in self.splits:
            probe_ids += self.images(split)[:3]
        probe = [self._images[i]["file_name"] for i in probe_ids]
        cands = self.image_root_candidates()
        for d in cands:
            if d.is_dir() and any((d / name).is_file() for name in probe):
                return d
        raise DatasetError(f"no image folder for {self.dataset} holds {probe[0] if probe else 'its images'}; "
                           "tried " + ", ".join(map(str, cands)) + " (pass image_root=...)")

    def image_path(self, image_id: int) -> Path:
        path = self.image_root / self._image_info(image_id)["file_name"]
        if not path.is_file():
            raise DatasetError(f"image {image_id} not found at {path}")
        return path

    # ------------------------------------------------------------------ geometry

    def box_xyxy(self, ann_id: int) -> tuple[float, float, float, float]:
        """COCO bbox ``[x, y, w, h]`` as float ``(x1, y1, x2, y2)``, continuous pixels."""
        x, y, w, h = (float(v) for v in self._ann(ann_id)["bbox"])
        return x, y, x + w, y + h

    def mask(self, ann_id: int) -> np.ndarray:
        """``bool`` H x W mask of an annotation, at its image's size."""
        ann = self._ann(ann_id)
        height, width = self.image_size(ann["image_id"])
        seg = ann["segmentation"]
        if isinstance(seg, list):
            polys = [p for p in seg if len(p) >= 6]  # a few COCO polygons are degenerate
            if not polys:
                return np.zeros((height, width), bool)
            rle = mask_utils.merge(mask_utils.frPyObjects(polys, height, width))
        elif isinstance(seg, dict) and isinstance(seg.get("counts"), list):
            rle = mask_utils.frPyObjects(seg, height, width)  # uncompressed RLE
        elif isinstance(seg, dict):
            counts = seg["counts"]
            rle = {"size": seg["size"], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
        else:
            raise DatasetError(f"annotation {ann_id} in {self.instances_path} has an unknown segmentation type")
        return mask_utils.decode(rle).astype(bool)

    def __repr__(self) -> str:
        return (f"ReferDataset({self.dataset!r}, split_by={self.split_by!r}, refs={len(self._refs)}, "
                f"root={str(self.data_root)!r})")
