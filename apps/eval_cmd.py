"""``groundseg eval``: score a checkpoint on a REFER split (RefCOCO/+/g or a synthetic set).

Registered in ``apps/cli.py``; user errors are :class:`~grounding.errors.GroundsegError` subclasses,
which the CLI prints as one line.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from apps.addon_options import ADDON_HELP, parse_addon_options


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
    engine: Annotated[str, typer.Option(help="grouped (image prefix computed once per image) or naive "
                                             "(one sentence at a time, as LISA/GLaMM).")] = "grouped",
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Longest answer to generate.")] = 128,
    num_procs: Annotated[int, typer.Option(min=1, help="Processes sharing the run by image (one per GPU; on CPU "
                                                       "they share the cores). Under torchrun, leave it at 1.")] = 1,
    addon: Annotated[Optional[list[str]], typer.Option("--addon", help=ADDON_HELP)] = None,
    protocol: Annotated[str, typer.Option(help="groundseg (this project's questions and --mode), or a published "
                                               "model's: qwen-vl, shikra, llava-1.5, qwen2-vl, qwen2.5-vl, lisa "
                                               "(its question, forced or generated answer, box reader, hit rule; "
                                               "--mode is then ignored).")] = "groundseg",
    mask_threshold: Annotated[float, typer.Option(help="Mask = decoder logit above this (0: probability 0.5, "
                                                       "LISA's and GLaMM's).")] = 0.0,
    quantize: Annotated[Optional[str], typer.Option(help="4bit or 8bit: the language model through bitsandbytes "
                                                         "(CUDA only).")] = None,
) -> None:
    """Evaluate REC (Acc@0.5) and/or RES (cIoU, gIoU) on one split; resumable."""
    from apps.cli import DEFAULT_MODEL
    from eval.harness import MODES, TASKS, EvalError
    from grounding.data.refer import ReferDataset

    # Check the cheap things before loading a model.
    if task not in TASKS:
        raise EvalError(f"unknown --task {task!r}; choose one of {', '.join(TASKS)}")
    if mode not in MODES:
        raise EvalError(f"unknown --mode {mode!r}; choose one of {', '.join(MODES)}")
    from eval.protocols import PROTOCOLS
    if protocol not in PROTOCOLS:
        raise EvalError(f"unknown --protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    if PROTOCOLS[protocol] is not None and task not in PROTOCOLS[protocol].tasks:
        raise EvalError(f"--protocol {protocol} scores {'/'.join(PROTOCOLS[protocol].tasks)}, not --task {task}")
    from eval.harness import ENGINES
    from eval.distributed import init_from_env, launched_by_torchrun, shutdown, spawn

    if engine not in ENGINES:
        raise EvalError(f"unknown --engine {engine!r}; choose one of {', '.join(ENGINES)}")
    addons = parse_addon_options(addon)
    data = ReferDataset(data_root, dataset, split_by)
    data.refs(split)  # an unknown split fails here, naming the splits the file has
    model_dir = Path(model) if model is not None else DEFAULT_MODEL
    options = dict(data_root=data_root, dataset=dataset, split_by=split_by, split=split, model_dir=model_dir,
                   device=device, task=task, mode=mode, out=out, limit=limit, batch_size=batch_size,
                   rec_box=rec_box, engine=engine, max_new_tokens=max_new_tokens, addons=addons,
                   protocol=protocol, mask_threshold=mask_threshold, quantize=quantize)
    if num_procs > 1 and not launched_by_torchrun():
        spawn(run_shard, num_procs, options)
    else:
        run_shard(init_from_env(), options)
        shutdown()
    typer.echo(f"wrote {out / 'predictions.jsonl'}, {out / 'metrics.json'} and {out / 'report.png'}")


def run_shard(shard, options: dict) -> dict:
    """One process's part of ``groundseg eval`` (the whole run when ``shard.world == 1``)."""
    from eval.harness import evaluate
    from grounding.data.refer import ReferDataset
    from grounding import Grounder

    o = options
    data = ReferDataset(o["data_root"], o["dataset"], o["split_by"])
    grounder = Grounder.from_pretrained(o["model_dir"], device=shard.device(o["device"]),
                                        max_new_tokens=o.get("max_new_tokens", 128), addons=o.get("addons"),
                                        mask_threshold=o.get("mask_threshold", 0.0), quantize=o.get("quantize"))
    return evaluate(grounder, data, o["split"], task=o["task"], mode=o["mode"], out_dir=o["out"], limit=o["limit"],
                    batch_size=o["batch_size"], progress=True, model_name=str(Path(o["model_dir"]).resolve()),
                    rec_box=o["rec_box"], engine=o["engine"], shard=shard, protocol=o.get("protocol", "groundseg"))
