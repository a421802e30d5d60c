"""``groundseg eval``: score a checkpoint on a REFER split (RefCOCO/+/g or a synthetic set).

Registered in ``apps/cli.py``; user errors are :class:`~grounding.errors.GroundsegError` subclasses,
which the CLI prints as one line.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def eval_command(
    data_root: Annotated[Path, typer.Option("--data-root", help="REFER folder: DATA_ROOT/DATASET/instances.json + refs(SPLIT_BY).p, "
                                                   "or a synthetic folder holding them itself.")],
    dataset: Annotated[str, typer.Option(help="refcoco, refcoco+, refcocog (ignored for a synthetic folder).")] = "refcoco",
    split_by: Annotated[str, typer.Option(help="unc (refcoco, refcoco+), umd or google (refcocog).")] = "unc",
    split: Annotated[str, typer.Option(help="val, testA, testB, test ...")] = "val",
    model: Annotated[Optional[Path], typer.Option(help="Checkpoint directory (default: the embedded model).")] = None,
    task: Annotated[str, typer.Option(help="res (cIoU, gIoU), rec (Acc@0.5) or both.")] = "both",
    mode: Annotated[str, typer.Option(help="generate, or teacher-forced (LISA's RES protocol; REC is still generated).")] = "generate",
    out: Annotated[Path, typer.Option(help="Output folder: predictions.jsonl, metrics.json, report.png. "
                                           "Rerunning into it resumes.")] = Path("out/eval"),
    limit: Annotated[Optional[int], typer.Option(min=1, help="Score only the first N sentences (image order).")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Sentences per forward pass.")] = 8,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1 ...")] = "auto",
    rec_box: Annotated[str, typer.Option(help="REC box: text (the box the answer writes; Qwen-VL protocol) "
                                              "or mask (the predicted mask's box; GLaMM's practice).")] = "text",
) -> None:
    """Evaluate REC (Acc@0.5) and/or RES (cIoU, gIoU) on one split; resumable."""
    from apps.cli import DEFAULT_MODEL
    from eval.harness import MODES, TASKS, EvalError, evaluate
    from grounding.data.refer import ReferDataset
    from grounding.predictor import Grounder

    # Check the cheap things before loading a model.
    if task not in TASKS:
        raise EvalError(f"unknown --task {task!r}; choose one of {', '.join(TASKS)}")
    if mode not in MODES:
        raise EvalError(f"unknown --mode {mode!r}; choose one of {', '.join(MODES)}")
    data = ReferDataset(data_root, dataset, split_by)
    data.refs(split)  # an unknown split fails here, naming the splits the file has
    model_dir = Path(model) if model is not None else DEFAULT_MODEL
    grounder = Grounder.from_pretrained(model_dir, device=device)
    evaluate(grounder, data, split, task=task, mode=mode, out_dir=out, limit=limit, batch_size=batch_size,
             progress=True, model_name=str(model_dir.resolve()), rec_box=rec_box)
    typer.echo(f"wrote {out / 'predictions.jsonl'}, {out / 'metrics.json'} and {out / 'report.png'}")
