"""REFER loader: safe unpickling, real RefCOCO / LISA layouts, synthetic folders, clear errors."""
from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from grounding.data.refer import ReferDataset, RestrictedUnpickler, load_refs_pickle
from shapes.scenes.synthetic import generate_dataset
from grounding.errors import DatasetError


class _Payload:
    """Unpickling this calls ``os.system`` (the classic pickle exploit)."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return os.system, (f"touch {self.target}",)


class _ExecPayload:
    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return exec, (f"open({str(self.target)!r}, 'w').close()",)


@pytest.mark.parametrize("payload", [_Payload, _ExecPayload])
@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_restricted_unpickler_refuses_code_and_runs_nothing(tmp_path, payload, protocol):
    target = tmp_path / "pwned"
    evil = tmp_path / "refs(unc).p"
    evil.write_bytes(pickle.dumps([{"ref_id": 1, "x": payload(target)}], protocol=protocol))
    with pytest.raises(DatasetError, match="refusing"):
        load_refs_pickle(evil)
    assert not target.exists()
    # Also through the dataset constructor.
    (tmp_path / "instances.json").write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    with pytest.raises(DatasetError, match="refusing"):
        ReferDataset(tmp_path)
    assert not target.exists()


def test_restricted_unpickler_reads_plain_data(tmp_path):
    data = [{"a": [1, 2.5, None, True], "b": "text", "c": (1, 2)}]
    import io
    for protocol in range(0, pickle.HIGHEST_PROTOCOL + 1):
        assert RestrictedUnpickler(io.BytesIO(pickle.dumps(data, protocol=protocol))).load() == data


def test_python2_byte_strings_decode_to_str():
    import io
    # [{'key': 'value', 'sent': 'caf\xe9'}] as Python 2's cPickle writes it (SHORT_BINSTRING opcodes).
    data = b"\x80\x02]q\x00}q\x01(U\x03keyq\x02U\x05valueq\x03U\x04sentq\x04U\x05caf\xc3\xa9q\x05ua."
    assert RestrictedUnpickler(io.BytesIO(data)).load() == [{"key": "value", "sent": "caf\u00e9"}]


def test_truncated_pickle_names_the_file(tmp_path):
    p = tmp_path / "refs(unc).p"
    p.write_bytes(pickle.dumps([{"ref_id": 1}])[:-3])
    with pytest.raises(DatasetError, match=str(p).replace("(", r"\(").replace(")", r"\)")):
        load_refs_pickle(p)


def _square_polygon(x, y, s):
    return [x, y, x + s, y, x + s, y + s, x, y + s]


def _make_real_layout(root: Path, image_dir: Path) -> None:
    """A two-image RefCOCO folder with the real naming conventions."""
    ann_dir = root / "refcoco"
    ann_dir.mkdir(parents=True)
    image_dir.mkdir(parents=True)
    images = [{"id": 9, "file_name": "COCO_train2014_000000000009.jpg", "width": 64, "height": 48,
               "license": 1, "coco_url": "", "flickr_url": "", "date_captured": ""},
              {"id": 25, "file_name": "COCO_train2014_000000000025.jpg", "width": 40, "height": 30}]
    rle = mask_utils.encode(np.asfortranarray(np.pad(np.ones((5, 6), np.uint8), ((10, 15), (20, 14)))))
    anns = [{"id": 1001, "image_id": 9, "category_id": 1, "iscrowd": 0, "area": 100.0,
             "bbox": [10.0, 20.0, 10.0, 10.0], "segmentation": [_square_polygon(10, 20, 10)]},
            {"id": 1002, "image_id": 9, "category_id": 2, "iscrowd": 0, "area": 64.0,
             "bbox": [30.0, 5.0, 8.0, 8.0], "segmentation": [_square_polygon(30, 5, 8), [1, 1, 2, 2]]},
            {"id": 1003, "image_id": 25, "category_id": 1, "iscrowd": 0, "area": 30.0,
             "bbox": [20.0, 10.0, 6.0, 5.0],
             "segmentation": {"size": [30, 40], "counts": rle["counts"].decode()}}]
    (ann_dir / "instances.json").write_text(json.dumps(
        {"images": images, "annotations": anns,
         "categories": [{"id": 1, "name": "person", "supercategory": "person"},
                        {"id": 2, "name": "cup", "supercategory": "kitchen"}]}))

    def ref(ref_id, ann_id, image_id, cat, split, sents):
        ids = [ref_id * 10 + k for k in range(len(sents))]
        return {"ref_id": ref_id, "ann_id": ann_id, "image_id": image_id, "category_id": cat,
                "split": split, "file_name": f"COCO_train2014_{image_id:012d}_{ann_id}.jpg",
                "sent_ids": ids, "sentences": [{"tokens": s.split(), "raw": s.capitalize(), "sent_id": i,
                                                "sent": s} for s, i in zip(sents, ids)]}

    refs = [ref(1, 1001, 9, 1, "testA", ["man on left", "guy in red"]),
            ref(2, 1002, 9, 2, "testB", ["white cup"]),
            ref(3, 1003, 25, 1, "val", ["woman"])]
    (ann_dir / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    for img in images:
        cv2.imwrite(str(image_dir / img["file_name"]), np.full((img["height"], img["width"], 3), 127, np.uint8))


@pytest.mark.parametrize("image_sub", ["images/train2014", "images/mscoco/images/train2014"])
def test_real_refcoco_layout_loads(tmp_path, image_sub):
    _make_real_layout(tmp_path, tmp_path / image_sub)
    ds = ReferDataset(tmp_path, "refcoco", "unc")
    assert ds.dataset == "refcoco" and ds.splits == ("testA", "testB", "val")
    assert [r.ref_id for r in ds.refs("testA")] == [1]
    sents = ds.sentences("testA")
    assert [(s.text, s.sent_id, s.ann_id, s.image_id, s.category_id) for s in sents] == \
        [("man on left", 10, 1001, 9, 1), ("guy in red", 11, 1001, 9, 1)]
    assert ds.images("testB") == [9] and ds.images() == [9, 25]
    assert set(ds.sentences_by_image()) == {9, 25}
    # The image file comes from instances.json, not the ref's suffixed file_name.
    assert ds.image_path(9) == tmp_path / image_sub / "COCO_train2014_000000000009.jpg"
    assert ds.image_root == tmp_path / image_sub
    assert ds.box_xyxy(1001) == (10.0, 20.0, 20.0, 30.0)
    m = ds.mask(1001)
    assert m.shape == (48, 64) and m.dtype == bool and m.sum() == 100 and m[20:30, 10:20].all()
    assert ds.mask(1002).sum() == 64  # the degenerate 2-point polygon is ignored
    rle_mask = ds.mask(1003)
    assert rle_mask.shape == (30, 40) and rle_mask.sum() == 30 and rle_mask[10:15, 20:26].all()


def test_image_folder_found_when_only_some_splits_are_present(tmp_path):
    _make_real_layout(tmp_path, tmp_path / "images" / "train2014")
    (tmp_path / "images" / "train2014" / "COCO_train2014_000000000009.jpg").unlink()  # testA/testB image
    ds = ReferDataset(tmp_path)
    assert ds.image_path(25).is_file()
    with pytest.raises(DatasetError, match="COCO_train2014_000000000009.jpg"):
        ds.image_path(9)


def test_explicit_image_root(tmp_path):
    _make_real_layout(tmp_path / "data", tmp_path / "elsewhere")
    ds = ReferDataset(tmp_path / "data", image_root=tmp_path / "elsewhere")
    assert ds.image_path(25).is_file()
    with pytest.raises(DatasetError, match="nowhere"):
        ReferDataset(tmp_path / "data", image_root=tmp_path / "nowhere").image_path(9)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(DatasetError) as err:
        ReferDataset(tmp_path, "refcoco")
    assert str(tmp_path / "refcoco" / "instances.json") in str(err.value)
    assert str(tmp_path / "instances.json") in str(err.value)

    _make_real_layout(tmp_path, tmp_path / "images" / "train2014")
    with pytest.raises(DatasetError) as err:
        ReferDataset(tmp_path, "refcoco", split_by="umd")
    assert str(tmp_path / "refcoco" / "refs(umd).p") in str(err.value)

    shutil.rmtree(tmp_path / "images")
    ds = ReferDataset(tmp_path, "refcoco")
    with pytest.raises(DatasetError) as err:
        ds.image_path(9)
    assert str(tmp_path / "images" / "mscoco" / "images" / "train2014") in str(err.value)
    assert str(tmp_path / "images" / "train2014") in str(err.value)
    with pytest.raises(DatasetError, match="testC"):
        ds.refs("testC")
    with pytest.raises(DatasetError, match="4242"):
        ds.mask(4242)


def test_synthetic_folder_loads_by_the_same_code(tmp_path):
    root = generate_dataset(tmp_path / "shapes_v1", 8, seed=11, image_size_range=((120, 140), (150, 170)),
                            progress=False)
    ds = ReferDataset(root)
    assert ds.dataset == "shapes_v1"
    refs = pickle.loads((root / "refs(unc).p").read_bytes())
    assert len(ds.sentences()) == sum(len(r["sentences"]) for r in refs)
    for image_id in ds.images():
        img = cv2.imread(str(ds.image_path(image_id)))
        assert img.shape[:2] == ds.image_size(image_id)
    s = ds.sentences()[0]
    assert ds.mask(s.ann_id).shape == ds.image_size(s.image_id)
    # ``dataset`` may also name a subfolder that holds the synthetic files.
    ds2 = ReferDataset(tmp_path, dataset="shapes_v1")
    assert ds2.dataset == "shapes_v1" and len(ds2.refs()) == len(ds.refs())
    assert ds2.image_path(s.image_id) == ds.image_path(s.image_id)
