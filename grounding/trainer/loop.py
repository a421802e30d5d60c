"""The training loop: ``groundseg train --config FILE [--resume]``, one stage of training (stages.py) per run.

Determinism and resume: the batch of optimizer step ``s`` is a pure function of (seed, s), and accelerate's
``save_state`` keeps model, optimizer, scheduler and RNG states, so a resumed run gives the same weights as
an uninterrupted one. A run writes ``OUT/log.jsonl`` (losses per step), ``OUT/loss.png``,
``OUT/checkpoints/step_N`` (the newest ``keep_checkpoints``) and ``OUT/model`` (refreshed at every save).
"""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator

from grounding.checkpoint import load_checkpoint, save_checkpoint
from grounding.presets import build_random
from grounding.progress import progress_bar
from grounding.trainer.config import TrainConfig
from grounding.trainer.data import TrainData
from grounding.trainer.stages import stage_class


def batch_indices(step: int, n: int, batch_size: int, seed: int) -> np.ndarray:
    """Indices of the (global) batch of ``step``: epochs are seeded permutations, concatenated."""
    start = step * batch_size
    out, pos = [], start
    while len(out) < batch_size:
        epoch, offset = divmod(pos, n)
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        take = perm[offset:offset + batch_size - len(out)]
        out.extend(take.tolist())
        pos += len(take)
    return np.asarray(out)



def _initial_model(cfg: TrainConfig, data: TrainData, stage, options):
    if cfg.init:
        model, tokenizer = load_checkpoint(cfg.init)
        stage.on_load(model, cfg, options)
    else:  # the tokenizer learns the words of the training text
        corpus = [t for c in data.conversations for t in (c.question, c.answer)]
        model, tokenizer = build_random(cfg.vlm_preset, cfg.decoder, seed=cfg.seed, corpus=corpus,
                                        vocab_size=cfg.vocab_size)
    for name, settings in cfg.addons.items():
        model.add_addon(name, settings, tokenizer)
    return model, tokenizer


def _lr_lambda(cfg: TrainConfig):
    def f(step: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


def warmup_cosine(optimizer: torch.optim.Optimizer, steps: int, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    """``optimizer``'s learning rate times a linear warm-up over ``warmup`` steps (at least one) and a cosine from 1 at
    step 0 to 0 at ``steps`` (the default model's head and encoder trainings, shapes/)."""
    warmup = max(warmup, 1)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(s, steps) / steps)))


def latest_checkpoint(out: Path) -> Path | None:
    steps = sorted((out / "checkpoints").glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
    return steps[-1] if steps else None


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True, stop_after: int | None = None) -> Path | None:
    """Run (or resume) one stage; returns the directory of the final checkpoint (``OUT/model``).

    stop_after: end this run after that global step, with its state saved (a time-boxed run that a later
    ``resume`` continues exactly); returns None then."""
    out = Path(cfg.out)
    mp = cfg.mixed_precision
    if mp == "auto":
        mp = "bf16" if torch.cuda.is_available() else "no"
    accelerator = Accelerator(mixed_precision=mp, cpu=not torch.cuda.is_available())
    torch.manual_seed(cfg.seed)
    stage = stage_class(cfg.stage)
    options = stage.parse_options(cfg.options)
    data = TrainData(cfg)
    model, tokenizer = _initial_model(cfg, data, stage, options)
    stage.prepare_model(model, tokenizer, cfg, options)
    processor = model.family.processor(model, tokenizer)
    task = stage(cfg, options, data, processor, model)
    params = [p for p in model.parameters() if p.requires_grad] + [p for m in task.modules for p in m.parameters()]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg))
    model, *task.modules, optimizer, scheduler = accelerator.prepare(model, *task.modules, optimizer, scheduler)
    raw = accelerator.unwrap_model(model)
    start = 0
    if resume and (ckpt := latest_checkpoint(out)) is not None:
        accelerator.load_state(str(ckpt))
        start = int(ckpt.name.split("_")[1])
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    log_path = out / "log.jsonl"
    if accelerator.is_main_process and log_path.is_file():  # a resumed run redoes the steps after its checkpoint
        kept = [l for l in log_path.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= start]
        log_path.write_text("".join(l + "\n" for l in kept))
    world, rank = accelerator.num_processes, accelerator.process_index
    per_step = cfg.batch_size * cfg.grad_accum
    bar = progress_bar(cfg.steps, f"stage {cfg.stage}", enabled=progress and accelerator.is_main_process,
                       completed=start, fields={"loss": "loss {}"})
    t0 = time.time()
    with bar as advance:
        for step in range(start, cfg.steps):
            model.train()
            idx = batch_indices(step, task.size, per_step * world, cfg.seed)
            idx = idx[rank * per_step:(rank + 1) * per_step]
            rng = np.random.default_rng([cfg.seed, step, rank, 7])
            parts: dict[str, float] = {"loss": 0.0}
            for micro in range(cfg.grad_accum):
                micro_idx = idx[micro * cfg.batch_size:(micro + 1) * cfg.batch_size]
                with accelerator.autocast():
                    loss, micro_parts = task.loss(model, raw, micro_idx, rng)
                accelerator.backward(loss / cfg.grad_accum)
                for k, v in {"loss": loss.item(), **micro_parts}.items():
                    parts[k] = parts.get(k, 0.0) + v / cfg.grad_accum
            accelerator.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if accelerator.is_main_process:
                record = {"step": step + 1, "lr": scheduler.get_last_lr()[0], "time_s": round(time.time() - t0, 2),
                          **{k: round(v, 5) for k, v in parts.items()}}
                with log_path.open("a") as f:
                    f.write(json.dumps(record) + "\n")
                advance(loss=f"{parts['loss']:.3f}")
            stopping = stop_after is not None and step + 1 >= stop_after and step + 1 < cfg.steps
            if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps or stopping:
                _save_state(accelerator, out, step + 1, cfg.keep_checkpoints)
                if accelerator.is_main_process:  # a usable model of the run so far, and its curve
                    save_checkpoint(raw, tokenizer, out / "model", merge_lora=cfg.merge_lora)
                    task.save(out)
                    plot_losses(log_path, out / "loss.png")
            if stopping:
                return None
    accelerator.wait_for_everyone()
    return out / "model"  # written with the last step's state


def _save_state(accelerator: Accelerator, out: Path, step: int, keep: int) -> None:
    """A training state (model, optimizer, scheduler, RNG) per N steps; only the newest ``keep`` stay."""
    path = out / "checkpoints" / f"step_{step}"
    tmp = path.with_name(f".tmp_step_{step}")
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        tmp.rename(path)  # a crash mid-save leaves only a .tmp folder, which resume ignores
        olds = sorted((out / "checkpoints").glob("step_*"), key=lambda p: int(p.name.split("_")[1]))[:-keep]
        for old in olds:
            shutil.rmtree(old, ignore_errors=True)


def plot_losses(log_path: Path, png_path: Path) -> Path | None:
    """Loss curves of a ``log.jsonl`` as a PNG (a moving average over noisy steps)."""
    if not log_path.is_file():
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    steps = np.array([r["step"] for r in records])
    fig, ax = plt.subplots(figsize=(7, 4))
    keys = list(dict.fromkeys(k for r in records for k in r if k not in ("step", "lr", "time_s")))
    for key in keys:
        values = np.array([r.get(key, 0.0) for r in records])
        if not values.any():
            continue
        k = max(1, len(values) // 50)
        smooth = np.convolve(values, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1:], smooth, label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path
