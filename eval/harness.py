"""RefCOCO-style evaluation of a :class:`~grounding.Grounder`: REC Acc@0.5, RES cIoU/gIoU.

``evaluate`` scores every sentence of one split of a REFER dataset and writes to ``out_dir``:

- ``predictions.jsonl``: one JSON line per sentence (see :func:`_line`), appended and flushed line by
  line; a rerun with the same ``out_dir`` RESUMES (sentences already there are not predicted again,
  a half-written last line is dropped, nothing is duplicated);
- ``metrics.json``: the scores, always computed from ALL lines of ``predictions.jsonl`` (so an
  interrupted-and-resumed run reports what an uninterrupted one does);
- ``report.png``: the scores as bars and histograms of the per-sentence mask and box IoU;
- ``run.json``: what the run was (task, mode, model...), so a resume into a folder holding another
  kind of run is refused instead of mixing the two.

Modes (reference.md section 5):

``generate`` (Sa2VA's protocol)
    The model writes its whole answer. RES and ``task="both"`` ask the first training phrasing of the
    segmentation question (``"Please segment {sent}."``; our models answer it with
    ``<ref>..</ref><box>..</box>[SEG]``), ``task="rec"`` the first REC phrasing. The predicted mask is
    the mask of the first target that has one (none: an empty mask); the predicted box is the TEXT box
    of the first target (none: a miss).
``teacher-forced`` (LISA's and GLaMM's protocol)
    RES: the answer is given (``Query.answer``) and only its [SEG] hidden state is read. LISA forces
    ``"[SEG]."``; our models were taught ``<ref>{sent}</ref><box>..</box>[SEG]``, and the box cannot be
    forced without giving the answer away, so the default forced answer is the prefix form
    ``teacher_answer="<ref>{sent}</ref>[SEG]"``; pass ``teacher_answer="[SEG]."`` for LISA's exact
    text. REC: the REC question's answer starts with the given ``<ref>{sent}</ref><box>``
    (``Query.answer_prefix``) and the model writes the box.

Protocols (``eval.protocols``, ``protocol=``): ``groundseg`` is what this docstring describes; the others ask
and score as a published model's own evaluation does (its question, generated or forced answer, box reader and
hit rule). Under a protocol one answer per sentence gives both the REC box (read by the protocol's reader) and
the RES mask (the first target's: a box-speaking family's mask is its box decoded by the mask decoder).

Engine: sentences are grouped by image and each image's group goes through
:class:`~grounding.PrefixEngine` (the image prefix's KV cache shared by its sentences), or, with
``engine="naive"``, one sentence at a time through the whole model. Both give the same lines (tested).

Conventions: boxes are float pixel ``(x1, y1, x2, y2)`` in the original image, continuous
coordinates; masks are ``bool`` ``H x W`` at the original resolution (RLE in the JSON lines). Scores
are fractions in [0, 1] (the printed table shows percentages).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from grounding.result import box_from_mask
from eval.report import ProgressBar, print_table, write_report
from eval.metrics import ResAccumulator, mask_iou_parts, rec_hit, sentence_iou, summarise
from eval.protocols import Protocol, get_protocol
from grounding.text.boxes import box_iou, parse_answer
from grounding.data.refer import ReferDataset, Sentence
from grounding.data.tasks import REC_QUESTIONS, SEG_QUESTIONS
from grounding.errors import GroundsegError
from grounding.result import Prediction, atomic_write_text, rle_decode, rle_encode
from grounding.text.tokens import SEG

TASKS = ("res", "rec", "both")
MODES = ("teacher-forced", "generate")
DEFAULT_TEACHER_ANSWER = "<ref>{sent}</ref>[SEG]"
LISA_TEACHER_ANSWER = "[SEG]."
REC_ANSWER_PREFIX = "<ref>{sent}</ref><box>"  # teacher-forced REC: the model writes the box after it
ENGINES = ("grouped", "naive")
SEG_QUESTION = SEG_QUESTIONS[0]  # "Please segment {s}."
REC_QUESTION = REC_QUESTIONS[0]  # "Where is {s}? Answer with a box."

PREDICTIONS = "predictions.jsonl"
METRICS = "metrics.json"
REPORT = "report.png"
RUN = "run.json"

# What identifies a run: a resume must match all of these.
_RUN_KEYS = ("task", "mode", "model", "dataset", "split_by", "split", "teacher_answer", "rec_mode", "rec_question",
             "rec_answer_prefix", "rec_box", "addons", "protocol", "mask_threshold")
_RUN_DEFAULTS = {"protocol": "groundseg", "mask_threshold": 0.0}   # what a run.json written before a key existed meant


class EvalError(GroundsegError):
    """An evaluation cannot run as asked (bad option, an out folder holding another run...)."""


# --------------------------------------------------------------------------- reading the lines


def read_predictions(path: str | os.PathLike, repair: bool = False) -> list[dict]:
    """The lines of a ``predictions.jsonl``, in file order, first occurrence of each sent_id kept.

    A last line without its newline was cut by a crash: it is ignored and, with ``repair=True``,
    removed from the file so that appending continues on a clean line. Any other unreadable line
    raises :class:`EvalError` (it was not written by this harness).
    """
    path = Path(path)
    if not path.is_file():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1  # bytes up to the end of the last complete line
    if repair and end < len(data):
        os.truncate(path, end)
    lines, seen = [], set()
    for number, raw in enumerate(data[:end].splitlines(), 1):
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
            sent_id = int(line["sent_id"])
        except (ValueError, KeyError, TypeError):
            raise EvalError(f"{path} line {number} is not a prediction line; "
                            "remove the file or use another --out folder") from None
        if sent_id not in seen:
            seen.add(sent_id)
            lines.append(line)
    return lines


def metrics_from_lines(lines: Sequence[dict], task: str) -> dict:
    """Scores from the stored per-sentence counts: RES from ``intersection``/``union``, REC from
    ``rec_hit``. ``n_sentences`` / ``n_images`` count the lines and their distinct images."""
    res = ResAccumulator() if task in ("res", "both") else None
    hits: list[bool] | None = [] if task in ("rec", "both") else None
    for line in lines:
        if res is not None:
            res.add_parts(line["intersection"], line["union"])
        if hits is not None:
            hits.append(bool(line["rec_hit"]))
    return _score_dict(summarise(res, hits), lines)


def recompute_metrics(predictions_jsonl: str | os.PathLike, dataset: ReferDataset, split: str,
                      task: str | None = None, protocol: str = "groundseg") -> dict:
    """Scores recomputed from scratch: predicted masks decoded from their RLE and boxes read from
    the lines, ground truth taken from ``dataset`` (nothing stored by the harness but the
    predictions themselves is trusted). ``task`` defaults to the one the lines record; ``protocol``
    gives the REC hit rule."""
    proto = get_protocol(protocol)
    hit = proto.hit if proto is not None else rec_hit
    lines = read_predictions(predictions_jsonl)
    if task is None:
        tasks = {line.get("task") for line in lines}
        if len(tasks) > 1:
            raise EvalError(f"{predictions_jsonl} mixes tasks {sorted(map(str, tasks))}")
        task = tasks.pop() if tasks else "both"
    by_id = {s.sent_id: s for s in dataset.sentences(split)}
    res = ResAccumulator() if task in ("res", "both") else None
    hits: list[bool] | None = [] if task in ("rec", "both") else None
    for line in lines:
        sent = by_id.get(int(line["sent_id"]))
        if sent is None:
            raise EvalError(f"{predictions_jsonl}: sent_id {line['sent_id']} is not in split {split!r}")
        if res is not None:
            pred = None if line.get("mask") is None else rle_decode(line["mask"])
            res.add(pred, dataset.mask(sent.ann_id))
        if hits is not None:
            hits.append(hit(line.get("box"), dataset.box_xyxy(sent.ann_id)))
    return _score_dict(summarise(res, hits), lines)


def _score_dict(scores: dict, lines: Sequence[dict]) -> dict:
    return {"cIoU": scores["cIoU"], "gIoU": scores["gIoU"], "acc@0.5": scores["acc@0.5"],
            "n_sentences": len(lines), "n_images": len({int(line["image_id"]) for line in lines})}


# --------------------------------------------------------------------------- one sentence


@dataclass
class _Outcome:
    """What the model gave for one sentence (before scoring)."""
    answer: str
    mask: np.ndarray | None           # RES prediction (None: no [SEG] mask)
    box: tuple | None                 # text box of the first target (None: none written)
    rec_answer: str | None = None     # the separate REC generation (teacher-forced + REC)
    notes: tuple[str, ...] = ()


def first_mask(pred: Prediction) -> np.ndarray | None:
    """The mask of the first target that has one."""
    return next((t.mask for t in pred.targets if t.mask is not None), None)


def first_text_box(pred: Prediction) -> tuple | None:
    """The box the answer's TEXT gives its first target, or None.

    ``Prediction.targets`` fills a missing text box with the mask's bounding box; REC must not
    score that (it would be RES in disguise), so the text is parsed again. The walk drops the
    parsed targets the predictor dropped (no box and no decoded mask), so the first one kept is
    ``pred.targets[0]``.
    """
    if not pred.targets:
        return None
    with_mask = {t.seg_index for t in pred.targets if t.mask is not None}
    for parsed in parse_answer(pred.answer, pred.image_size):
        if parsed.box is not None or parsed.seg_index in with_mask:
            return parsed.box
    return None


def _line(sent: Sentence, task: str, mode: str, question: str, out: _Outcome,
          gt_mask: np.ndarray | None, gt_box: tuple, hit=rec_hit) -> dict:
    """One ``predictions.jsonl`` record. RES fields (``mask``, ``intersection``, ``union``,
    ``mask_iou``) are null when RES is not scored; ``rec_hit`` is null when REC is not scored;
    ``box``/``box_iou`` are filled whenever the answer wrote a box (``box_iou`` 0.0 without one)."""
    line: dict[str, Any] = {
        "ref_id": sent.ref_id, "sent_id": sent.sent_id, "image_id": sent.image_id, "ann_id": sent.ann_id,
        "sentence": sent.text, "task": task, "mode": mode, "question": question, "answer": out.answer,
        "rec_answer": out.rec_answer,
        "box": None if out.box is None else [float(v) for v in out.box],
        "mask": None, "intersection": None, "union": None, "mask_iou": None,
        "box_iou": 0.0 if out.box is None else float(box_iou(out.box, gt_box)),
        "rec_hit": hit(out.box, gt_box) if task in ("rec", "both") else None,
        "notes": list(out.notes),
    }
    if gt_mask is not None:
        i, u = mask_iou_parts(out.mask, gt_mask)
        line.update(mask=None if out.mask is None else rle_encode(out.mask), intersection=i, union=u,
                    mask_iou=sentence_iou(i, u))
    return line


# --------------------------------------------------------------------------- the run


def _check_options(task: str, mode: str, batch_size: int, limit: int | None, teacher_answer: str) -> None:
    if task not in TASKS:
        raise EvalError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if mode not in MODES:
        raise EvalError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if int(batch_size) < 1:
        raise EvalError(f"batch size must be >= 1, got {batch_size}")
    if limit is not None and int(limit) < 1:
        raise EvalError(f"limit must be >= 1, got {limit}")
    if mode == "teacher-forced" and task != "rec" and SEG not in teacher_answer:
        raise EvalError(f"the teacher-forced answer {teacher_answer!r} has no {SEG}: it would give no mask")


def _run_info(grounder, dataset: ReferDataset, split: str, task: str, mode: str, teacher_answer: str,
              model_name: str | None) -> dict:
    forced = mode == "teacher-forced"
    return {
        "task": task, "mode": mode,
        "model": model_name or getattr(grounder, "name", None) or "unknown",
        "dataset": dataset.dataset, "split_by": dataset.split_by, "split": split,
        "res_mode": mode if task != "rec" else None,
        "rec_mode": mode if task != "res" else None,
        "rec_answer_prefix": REC_ANSWER_PREFIX if forced and task != "res" else None,
        "teacher_answer": teacher_answer if forced and task != "rec" else None,
        # which question the REC box answers: the segmentation question's answer (generate + both)
        # or a separate REC question
        "rec_question": None if task == "res" else (SEG_QUESTION if task == "both" and not forced else REC_QUESTION),
        "seg_question": SEG_QUESTION if task != "rec" else None,
        "addons": getattr(grounder, "addon_settings", None),   # the add-ons the answers went through
        "mask_threshold": float(getattr(grounder, "mask_threshold", 0.0)),
    }


def _check_resume(out: Path, info: dict) -> None:
    path = out / RUN
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            raise EvalError(f"{path} is not readable JSON; remove it or use another --out folder") from None
        diff = [k for k in _RUN_KEYS if old.get(k, _RUN_DEFAULTS.get(k)) != info.get(k)]
        if diff:
            k = diff[0]
            raise EvalError(f"{out} holds a run with {k}={old.get(k, _RUN_DEFAULTS.get(k))!r}, not {info.get(k)!r}: "
                            "use another --out folder (or delete it) instead of mixing runs")
    elif (out / PREDICTIONS).is_file() and (out / PREDICTIONS).stat().st_size:
        raise EvalError(f"{out / PREDICTIONS} exists without {RUN}: cannot tell which run it belongs to")
    atomic_write_text(path, json.dumps(info, indent=2))


def evaluate(grounder, dataset: ReferDataset, split: str, task: str = "both", mode: str = "generate",
             out_dir: str | os.PathLike = "out/eval", limit: int | None = None, batch_size: int = 8,
             progress: bool = True, *, teacher_answer: str = DEFAULT_TEACHER_ANSWER,
             max_new_tokens: int | None = None, model_name: str | None = None, rec_box: str = "text",
             engine: str = "grouped", shard=None, protocol: str = "groundseg") -> dict:
    """Score ``grounder`` on ``split`` of ``dataset``; returns (and writes) ``metrics.json``'s dict.

    task: ``"res"`` (masks: cIoU, gIoU), ``"rec"`` (boxes: Acc@0.5) or ``"both"``.
    mode: ``"generate"`` or ``"teacher-forced"`` (RES only; REC is then generated), see the module
        docstring. ``teacher_answer`` is the forced answer, ``{sent}`` replaced by the sentence.
    limit: score only the first ``limit`` sentences in image order (a quick look).
    batch_size: sentences per forward pass. Sentences are sorted by image, so each image is
        encoded by the mask decoder once (the Grounder caches embeddings by content).
    progress: show a progress bar (sentences/s, running cIoU) and print the score table.
    model_name: what ``metrics.json`` calls the model (e.g. the checkpoint path).
    rec_box: ``"text"`` (default; Qwen-VL / Shikra protocol: the box the answer writes) or ``"mask"`` (the
        tight box of the predicted mask, GLaMM's practice for [SEG] models); recorded in ``metrics.json``.
    engine: ``"grouped"`` (default: shared image prefix, see :mod:`grounding.inference.engine`) or ``"naive"`` (one
        sentence at a time, the whole model each time, as LISA and GLaMM run).
    protocol: ``groundseg`` (default: the above) or a published model's protocol (``eval.protocols``); it
        sets the questions, the mode (``mode`` is then ignored), the forced answer, the REC reader and hit rule.
    shard: an :class:`eval.distributed.Shard` when several processes share the run (each takes every
        ``world``-th image and writes ``predictions.rank{r}.jsonl``; rank 0 merges them into
        ``predictions.jsonl`` and writes the metrics; the other ranks return ``{}``).
    """
    if engine not in ENGINES:
        raise EvalError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if rec_box not in ("text", "mask"):
        raise EvalError(f"rec_box must be 'text' or 'mask', got {rec_box!r}")
    try:
        proto = get_protocol(protocol)
    except ValueError as err:
        raise EvalError(str(err)) from None
    if proto is not None:
        if task not in proto.tasks:
            raise EvalError(f"protocol {protocol!r} scores {'/'.join(proto.tasks)}, not task {task!r}")
        if rec_box != "text":
            raise EvalError(f"protocol {protocol!r} reads the REC box from the answer's text: rec_box must be 'text'")
        mode, teacher_answer = proto.mode, proto.teacher_answer or DEFAULT_TEACHER_ANSWER
    _check_options(task, mode, batch_size, limit, teacher_answer)
    started = time.perf_counter()
    info = _run_info(grounder, dataset, split, task, mode, teacher_answer, model_name)
    info["protocol"] = protocol
    if proto is not None:
        info.update(seg_question=proto.question if task != "rec" else None,
                    rec_question=proto.question if task != "res" else None,
                    rec_answer_prefix=proto.answer_prefix if task != "res" else None,
                    teacher_answer=proto.teacher_answer if task != "rec" else None)
    if task != "res":
        info["rec_box"] = rec_box
        if rec_box == "mask":
            info["rec_question"], info["rec_answer_prefix"] = SEG_QUESTION, None
    else:
        info["rec_box"] = None
    sentences = sorted(dataset.sentences(split), key=lambda s: (s.image_id, s.sent_id))  # unknown split: raises
    if limit is not None:
        sentences = sentences[: int(limit)]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _check_resume(out, info)

    rank, world = (shard.rank, shard.world) if shard is not None else (0, 1)
    # done: every line already written, by this run's ranks or an interrupted run's (any world size)
    lines = read_all_predictions(out, repair_rank=rank if world > 1 else None)
    done = {int(line["sent_id"]) for line in lines}
    # Packs of whole images (about batch_size sentences each), fixed by the sentence list and batch_size
    # alone; ranks take every world-th pack. A pack that is partly written is predicted whole again (only
    # its missing lines are written), so every sentence shares its batch with the same sentences as in an
    # uninterrupted or single-process run: results depend on the batch by float rounding, and a resumed
    # or sharded run must report what an uninterrupted single process does.
    packs = pack_groups(image_groups(sentences), batch_size)[rank::world]
    todo = [pk for pk in packs if any(s.sent_id not in done for g in pk for s in g)]
    n_todo = sum(s.sent_id not in done for pk in todo for g in pk for s in g)
    n_mine = sum(len(g) for pk in packs for g in pk)

    running = ResAccumulator()
    for line in lines:
        if line.get("intersection") is not None:
            running.add_parts(line["intersection"], line["union"])
    predict_time, n_new = 0.0, 0
    predict = _predict_function(grounder, engine, batch_size, max_new_tokens)
    images = _ImageCache(dataset, getattr(grounder, "max_pixels", None))
    pred_path = out / (PREDICTIONS if world == 1 else f"predictions.rank{rank}.jsonl")
    with ProgressBar(n_mine, n_mine - n_todo, progress and rank == 0) as advance, \
            open(pred_path, "a", encoding="utf-8") as handle:
        for pack in todo:
            t0 = time.perf_counter()
            pixels = [images(g[0].image_id) for g in pack]
            outcomes = (_predict_pack(predict, pack, pixels, task, mode, teacher_answer, rec_box) if proto is None
                        else _predict_protocol_pack(predict, pack, pixels, proto, _input_size(grounder)))
            predict_time += time.perf_counter() - t0
            for sent, outcome in zip([s for g in pack for s in g], outcomes):
                if sent.sent_id in done:
                    continue
                question = ((REC_QUESTION if task == "rec" else SEG_QUESTION).format(s=sent.text) if proto is None
                            else proto.question_for(sent.text))
                gt_mask = dataset.mask(sent.ann_id) if task != "rec" else None
                line = _line(sent, task, mode, question, outcome, gt_mask, dataset.box_xyxy(sent.ann_id),
                             hit=proto.hit if proto is not None else rec_hit)
                # one write per complete line, then flush: a crash leaves at most a cut last line
                handle.write(json.dumps(line) + "\n")  # ASCII: any text the model wrote survives
                handle.flush()
                done.add(sent.sent_id)
                n_new += 1
                if line["intersection"] is not None:
                    running.add_parts(line["intersection"], line["union"])
                advance(n_new / predict_time if predict_time > 0 else 0.0, running.ciou)
            os.fsync(handle.fileno())

    # throughput of all ranks together: sentences over the slowest rank's prediction time
    n_new, predict_time = _all_ranks(shard, n_new, predict_time)
    if rank != 0:
        return {}
    lines = merge_predictions(out)
    wall = time.perf_counter() - started
    metrics = {**metrics_from_lines(lines, task), **info,
               "engine": engine, "num_procs": world,
               "n_new_sentences": n_new, "n_resumed_sentences": len(lines) - n_new,
               "wall_time_s": round(wall, 3),
               "sentences_per_s": round(n_new / predict_time, 3) if predict_time > 0 and n_new else None,
               "encoder_calls": getattr(grounder, "encoder_calls", None) if world == 1 else None,
               "zoom_crops": getattr(grounder, "zoom_crops", None) if world == 1 else None}
    atomic_write_text(out / METRICS, json.dumps(metrics, indent=2))
    write_report(out / REPORT, metrics, lines)
    if progress:
        print_table(metrics)
    return metrics


def image_groups(sentences: Sequence[Sentence]) -> list[list[Sentence]]:
    """Sentences (sorted by image) -> one list per image, in order."""
    groups: list[list[Sentence]] = []
    for sent in sentences:
        if groups and groups[-1][0].image_id == sent.image_id:
            groups[-1].append(sent)
        else:
            groups.append([sent])
    return groups


def pack_groups(groups: Sequence[list[Sentence]], batch_size: int) -> list[list[list[Sentence]]]:
    """Consecutive image groups packed into lists of about ``batch_size`` sentences (an image is never
    split; one larger than ``batch_size`` is a pack of its own)."""
    packs: list[list[list[Sentence]]] = []
    rows = 0
    for group in groups:
        if packs and rows + len(group) <= batch_size:
            packs[-1].append(group)
            rows += len(group)
        else:
            packs.append([group])
            rows = len(group)
    return packs


def _rank_files(out: Path) -> list[Path]:
    return sorted(out.glob("predictions.rank*.jsonl"))


def read_all_predictions(out: Path, repair_rank: int | None = None) -> list[dict]:
    """Lines of ``predictions.jsonl`` and of the per-rank files a sharded run writes (first occurrence of a
    sentence kept). Single-process runs repair ``predictions.jsonl``'s cut last line; rank ``r`` repairs
    only its own file (the others may still be written by their ranks)."""
    lines = read_predictions(out / PREDICTIONS, repair=repair_rank is None)
    for path in _rank_files(out):
        lines += read_predictions(path, repair=path.name == f"predictions.rank{repair_rank}.jsonl")
    seen: set[int] = set()
    return [line for line in lines if not (int(line["sent_id"]) in seen or seen.add(int(line["sent_id"])))]


def merge_predictions(out: Path) -> list[dict]:
    """Fold the per-rank files into ``predictions.jsonl`` (sorted by image, then sentence: the order a
    single process writes), atomically, then remove them. Returns the lines."""
    files = _rank_files(out)
    lines = read_all_predictions(out)
    if files:
        lines.sort(key=lambda line: (int(line["image_id"]), int(line["sent_id"])))
        atomic_write_text(out / PREDICTIONS, "".join(json.dumps(line) + "\n" for line in lines))
        for path in files:
            path.unlink()
    return lines


def _all_ranks(shard, n_new: int, predict_time: float) -> tuple[int, float]:
    if shard is None or shard.world == 1:
        return n_new, predict_time
    counts = shard.all_gather((n_new, predict_time))  # also the barrier before rank 0 merges
    return sum(c[0] for c in counts), max(c[1] for c in counts)


class _ImageCache:
    """Pixels of the current image: sentences come sorted by image, so one entry is enough, and
    each file is read once (the Grounder caches the expensive part, the decoder's embedding)."""

    def __init__(self, dataset: ReferDataset, max_pixels: int | None):
        self.dataset, self.max_pixels = dataset, max_pixels
        self._key: int | None = None
        self._pixels: np.ndarray | None = None

    def __call__(self, image_id: int) -> np.ndarray:
        if image_id != self._key:
            from grounding.images import load_image
            kwargs = {} if self.max_pixels is None else {"max_pixels": self.max_pixels}
            pixels = load_image(self.dataset.image_path(image_id), **kwargs)
            expected = self.dataset.image_size(image_id)
            if pixels.shape[:2] != expected:
                raise EvalError(f"image {image_id} ({self.dataset.image_path(image_id)}) is "
                                f"{pixels.shape[0]}x{pixels.shape[1]} but its annotations say "
                                f"{expected[0]}x{expected[1]} (H x W): masks would not line up")
            self._key, self._pixels = image_id, pixels
        return self._pixels  # type: ignore[return-value]


def _predict_function(grounder, engine: str, batch_size: int, max_new_tokens: int | None):
    """``predict([(pixels, queries), ...]) -> [[prediction, ...], ...]`` for the questions of some images.

    ``grouped``: :class:`~grounding.PrefixEngine` (each image's prefix and its KV cache computed once,
    questions batched across the pack's images, masks decoded per image in one call). ``naive``: one
    question at a time through ``Grounder.predict_batch`` with the embedding cache emptied first - the
    LISA / GLaMM pipeline, which runs the whole model per sentence (the reference for speed and results).
    A question the model refuses (e.g. too long for its context) becomes an empty prediction with the
    reason in its notes instead of stopping the whole evaluation.
    """
    if engine == "grouped":
        from grounding import PrefixEngine
        prefix_engine = PrefixEngine(grounder)

        def run(groups):
            return prefix_engine.predict_groups(groups, batch_size=batch_size, max_new_tokens=max_new_tokens)
    else:
        def run(groups):
            out = []
            for _, queries in groups:
                out.append([])
                for q in queries:
                    grounder.clear_cache()
                    out[-1] += grounder.predict_batch([q], batch_size=1, max_new_tokens=max_new_tokens)
            return out

    def predict(groups):
        try:
            return run(groups)
        except GroundsegError as err:
            if len(groups) == 1 and len(groups[0][1]) == 1:
                pixels, (query,) = groups[0]
                return [[Prediction(answer="", targets=[], image_size=pixels.shape[:2], question=query.question,
                                    notes=[f"not predicted: {err}"])]]
        # find the refused question(s): one at a time
        return [[predict([(pixels, [q])])[0][0] for q in queries] for pixels, queries in groups]
    return predict


def _predict_pack(predict, pack: Sequence[list[Sentence]], pixels: Sequence[np.ndarray], task: str, mode: str,
                  teacher_answer: str, rec_box: str) -> list[_Outcome]:
    """The outcomes of a pack's sentences (image by image, in order)."""
    from grounding import Query

    forced = mode == "teacher-forced"

    def ask(make) -> list[Prediction]:
        answers = predict([(px, [make(s, px) for s in group]) for group, px in zip(pack, pixels)])
        return [p for per_image in answers for p in per_image]

    def seg_query(s, px):
        return Query(px, SEG_QUESTION.format(s=s.text), answer=teacher_answer.replace("{sent}", s.text) if forced else None)

    def rec_query(s, px):  # teacher-forced: the model writes the box after the given "<ref>{sent}</ref><box>"
        return Query(px, REC_QUESTION.format(s=s.text),
                     answer_prefix=REC_ANSWER_PREFIX.format(sent=s.text) if forced else None)

    if rec_box == "mask":  # REC from the segmentation answer's mask: one prediction gives both
        return [_Outcome(p.answer, first_mask(p) if task != "rec" else None,
                         box_from_mask(m) if (m := first_mask(p)) is not None else None,
                         notes=tuple(p.notes)) for p in ask(seg_query)]
    if task == "rec":
        return [_Outcome(p.answer, None, first_text_box(p), notes=tuple(p.notes)) for p in ask(rec_query)]
    seg_preds = ask(seg_query)
    if not forced:  # one generated answer gives both the mask and the box
        return [_Outcome(p.answer, first_mask(p), first_text_box(p), notes=tuple(p.notes)) for p in seg_preds]
    if task == "res":  # a forced answer has no box of the model's own: REC is not scored
        return [_Outcome(p.answer, first_mask(p), None, notes=tuple(p.notes)) for p in seg_preds]
    rec_preds = ask(rec_query)
    return [_Outcome(sp.answer, first_mask(sp), first_text_box(rp), rec_answer=rp.answer,
                     notes=tuple(sp.notes) + tuple(rp.notes)) for sp, rp in zip(seg_preds, rec_preds)]


def _input_size(grounder):
    """``(H, W) -> (H', W')``: the size at which the grounder's VLM sees an image (``ModelFamily.input_size``)."""
    family = getattr(getattr(grounder, "model", None), "family", None)
    return family.input_size if family is not None else (lambda size: size)


def _predict_protocol_pack(predict, pack: Sequence[list[Sentence]], pixels: Sequence[np.ndarray], proto: Protocol,
                           input_size) -> list[_Outcome]:
    """The outcomes of a pack's sentences under ``proto``: one question per sentence; its answer gives the REC box
    (the protocol's reader, on what the model generated) and the RES mask (the first target's)."""
    from grounding import Query

    forced = proto.mode == "teacher-forced"
    answers = predict([(px, [Query(px, proto.question_for(s.text), answer=proto.answer_for(s.text) if forced else None,
                                   answer_prefix=None if forced else proto.prefix_for(s.text)) for s in group])
                       for group, px in zip(pack, pixels)])
    out = []
    for group, per_image in zip(pack, answers):
        for s, p in zip(group, per_image):
            box, why = (None, None) if proto.reader is None else proto.read_box(
                p.answer, p.image_size, input_size(p.image_size), proto.prefix_for(s.text))
            notes = tuple(p.notes) + ((f"REC: {why}",) if why and proto.reader is not None else ())
            out.append(_Outcome(p.answer, first_mask(p), box, notes=notes))
    return out
