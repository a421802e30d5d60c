"""The ``groundseg`` command line. Every user-facing failure prints one line and exits non-zero;
set GROUNDSEG_DEBUG=1 to see the traceback of an unexpected one."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from apps.addon_options import ADDON_HELP, parse_addon_options
from grounding.errors import GroundsegError, PromptError

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "weights" / "shapes-tiny"

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Grounding and segmentation: boxes and masks for what a question names.")
console = Console(stderr=True)


def _numbers(text: str, n: tuple[int, ...], what: str) -> list[float]:
    try:
        values = [float(v) for v in text.replace(" ", "").split(",")]
    except ValueError:
        raise PromptError(f"{what} {text!r} is not a list of numbers") from None
    if len(values) not in n:
        raise PromptError(f"{what} {text!r} needs {' or '.join(map(str, n))} comma-separated numbers")
    return values


def _model_dir(model: Optional[Path]) -> Path:
    return model if model is not None else DEFAULT_MODEL


@app.command()
def predict(
    image: Optional[Path] = typer.Option(None, help="Image file (any format Pillow reads; EXIF orientation is applied)."),
    video: Optional[Path] = typer.Option(None, help="Video file or folder of frames instead of --image: the question (or the clicks/box, on --key-frame) is tracked through every frame."),
    key_frame: int = typer.Option(0, min=0, help="Video: the frame the question is asked on (or the clicks/box are on)."),
    video_mode: str = typer.Option("auto", help="Video: auto, memory (SAM2), reask or carry (see grounding/video/predict.py)."),
    every: int = typer.Option(8, min=0, help="Video, reask mode: ask the VLM again every N frames (0: never)."),
    question: Optional[str] = typer.Option(None, help="Question; without it, --points/--box go to the mask decoder alone."),
    points: list[str] = typer.Option([], "--points", help="Click x,y[,label] in pixels (label 1 object, 0 background); repeat."),
    box: list[str] = typer.Option([], "--box", help="Box x1,y1,x2,y2 in pixels; repeat for several."),
    out: Optional[Path] = typer.Option(None, help="Where to write the JSON result (masks as COCO RLE; default result.json); with --video a folder (default video_result) for frames.jsonl, overlay.mp4, video.json."),
    overlay: Optional[Path] = typer.Option(None, help="Also write a picture of the masks and boxes (PNG/JPEG)."),
    model: Optional[Path] = typer.Option(None, help="Checkpoint directory (default: the embedded shapes-tiny)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:1 ..."),
    max_new_tokens: int = typer.Option(256, min=1, help="Longest answer to generate (less where a long question "
                                                        "leaves the model less room)."),
    answer_prefix: Optional[str] = typer.Option(None, help=(
        "Image questions: the answer starts with this text and the model writes the rest; "
        "'<ref>the circle</ref>' asks for that phrase's mask whatever the model would have answered.")),
    answer: Optional[str] = typer.Option(None, help=(
        "Image questions: the whole answer is given (teacher forcing, as LISA's evaluation does): nothing is "
        "generated and each [SEG] in it becomes a mask, e.g. '[SEG].'")),
    mask_threshold: float = typer.Option(0.0, help="Mask = decoder logit above this (0: probability 0.5)."),
    quantize: Optional[str] = typer.Option(None, help="4bit or 8bit: load the language model through bitsandbytes "
                                                      "(CUDA only; the mask decoder stays in bf16)."),
    addon: Optional[list[str]] = typer.Option(None, "--addon", help=ADDON_HELP),
) -> None:
    """Answer a question about an image (or a video) with boxes and masks, or segment (track) clicks and boxes."""
    from apps.overlay import draw_overlay, save_image
    from grounding import Grounder

    pts = [_numbers(p, (2, 3), "point") for p in points]
    labels = [int(p[2]) if len(p) == 3 else 1 for p in pts]
    boxes = [_numbers(b, (4,), "box") for b in box]
    if question is None and not pts and not boxes:
        raise PromptError("give --question, or --points / --box for the click path")
    if (image is None) == (video is None):
        raise PromptError("give exactly one of --image and --video")
    for name, value in (("--answer-prefix", answer_prefix), ("--answer", answer)):
        if value is not None and (question is None or video is not None):
            raise PromptError(f"{name} goes with --question on an --image")
    grounder = Grounder.from_pretrained(_model_dir(model), device=device, max_new_tokens=max_new_tokens,
                                        addons=parse_addon_options(addon), mask_threshold=mask_threshold,
                                        quantize=quantize)
    xy = [p[:2] for p in pts] or None
    if video is not None:
        from grounding.video import predict_video, track
        if overlay is not None:
            raise PromptError("--overlay is for images; a video job always writes OUT/overlay.mp4")
        if len(boxes) > 1:
            raise PromptError("click-to-track takes one --box (and any --points) for one object")
        if question is None:
            run = track(grounder, video, key_frame, points=xy, point_labels=labels or None,
                        box=boxes[0] if boxes else None, mode=video_mode)
        else:
            if xy or boxes:
                raise PromptError("with --video, give --question or --points/--box, not both")
            run = predict_video(grounder, video, question, key_frame, mode=video_mode, every=every)
        paths = run.save(out or Path("video_result"), draw=draw_overlay)
        _print_video(run, paths)
        return
    out = out or Path("result.json")
    if question is None:
        result = grounder.segment(image, points=xy, point_labels=labels or None, boxes=boxes or None)
    else:
        result = grounder.predict(image, question, points=xy, point_labels=labels or None, boxes=boxes or None,
                                  answer=answer, answer_prefix=answer_prefix)
    result.save_json(out)
    if overlay is not None:
        pixels = grounder.prepare([image])[0].pixels
        save_image(overlay, draw_overlay(pixels, result, points=xy, point_labels=labels or None, boxes=boxes or None))
    _print_result(result, out, overlay)


@app.command("init-tiny")
def init_tiny(
    directory: Path = typer.Argument(..., help="Where to write the checkpoint."),
    seed: int = typer.Option(0, help="Random seed of the weights."),
    backend: str = typer.Option("sam", help="Mask decoder backend: sam or sam2."),
) -> None:
    """Write a tiny random checkpoint: for tests, and to try the CLI before trained weights exist."""
    from grounding.presets import init_tiny as write_tiny

    path = write_tiny(directory, seed=seed, backend=backend)
    console.print(f"wrote a tiny random {backend} checkpoint to {path}")


@app.command()
def synth(
    out: Path = typer.Option(..., help="Folder to write the REFER-format dataset to."),
    images: int = typer.Option(1000, min=1, help="Number of scenes."),
    seed: int = typer.Option(0, help="Random seed: the same seed writes the same bytes."),
    videos: int = typer.Option(0, min=0, help="Also write this many moving-shape videos under OUT/videos."),
    min_side: int = typer.Option(160, min=32, help="Smallest image height/width in pixels."),
    max_side: int = typer.Option(320, min=32, help="Largest image height/width in pixels."),
    turned: bool = typer.Option(False, help="Also draw rectangles at any angle and diamonds lying on their side."),
) -> None:
    """Generate a synthetic referring dataset (REFER format: images/, instances.json, refs(unc).p)."""
    from shapes.scenes.synthetic import generate_dataset, generate_video_dataset

    if max_side < min_side:
        raise PromptError(f"--max-side {max_side} is smaller than --min-side {min_side}")
    sides = (min_side, max_side)
    path = generate_dataset(out, images, seed, image_size_range=(sides, sides), turned=turned)
    if videos:
        generate_video_dataset(Path(out) / "videos", videos, seed)
    console.print(f"wrote {images} scenes to {path}")


@app.command()
def train(
    config: Path = typer.Option(..., help="Training config (JSON or YAML; fields of grounding.trainer.TrainConfig; other keys are the stage's options)."),
    resume: bool = typer.Option(False, help="Continue from the newest checkpoint in the config's out folder."),
    steps: Optional[int] = typer.Option(None, help="Override the number of optimizer steps."),
    out: Optional[str] = typer.Option(None, help="Override the output folder."),
    stop_after: Optional[int] = typer.Option(None, min=1, help="End this run after step N (state saved; --resume continues)."),
) -> None:
    """Train one stage (1: base VLM + mask decoder; 2: LoRA + [SEG], LISA's recipe)."""
    from grounding.trainer import TrainConfig, train as run_training

    if not config.is_file():
        raise PromptError(f"no training config at {config}")
    cfg = TrainConfig.load(config, steps=steps, out=out)
    final = run_training(cfg, resume=resume, stop_after=stop_after)
    console.print(f"model written to {final or Path(cfg.out) / 'model'}" + (f" (stopped after step {stop_after})" if final is None else ""))


@app.command("train-locator")
def train_locator(
    data: Path = typer.Option(..., help="REFER folder to learn from (its train split; scored on --eval-split)."),
    out: Path = typer.Option(..., help="Output folder: OUT/model is the model with the new locator."),
    model: Optional[Path] = typer.Option(None, help="Checkpoint directory (default: the embedded shapes-tiny)."),
    steps: int = typer.Option(3000, min=1, help="Optimizer steps."),
    batch_size: int = typer.Option(64, min=1, help="Phrases per step."),
    lr: float = typer.Option(1e-3, min=0.0, help="Peak learning rate (warm-up, then cosine)."),
    layers: int = typer.Option(2, min=1, max=12, help=(
        "Transformer layers of the fusion locator (a trained locator of fewer layers keeps them and grows new ones "
        "that start as the identity).")),
    seed: int = typer.Option(0, help="Seed of the batch order and the initial weights."),
    eval_split: str = typer.Option("val", help="Split scored every --eval-every steps (top-1 cell on the object)."),
    eval_every: int = typer.Option(500, min=1, help="Steps between scores."),
    dataset: str = typer.Option("synth", help="REFER dataset name of --data (refcoco, refcoco+, refcocog, synth)."),
    split_by: str = typer.Option("unc", help="REFER split scheme (unc, umd, google)."),
    extra_data: list[Path] = typer.Option([], help="More REFER folders whose train split is learnt too "
                                                   "(repeat the option); scores stay on --data."),
) -> None:
    """Give a model a fusion [SEG] locator, trained on cached image tokens (every other weight is kept)."""
    from shapes.locator_train import train_locator as run

    scores = run(_model_dir(model), data, out, steps=steps, batch_size=batch_size, lr=lr, layers=layers, seed=seed,
                 eval_split=eval_split, eval_every=eval_every, dataset=dataset, split_by=split_by,
                 extra_data=extra_data)
    top1 = ", ".join(f"{'all' if k == 'top1' else k[5:]} {v:.1%}" for k, v in scores.items() if k.startswith("top1"))
    console.print(f"model written to {out / 'model'}; {eval_split}: top-1 cell on the object {top1}; "
                  f"box Acc@0.5 at that cell {scores['box_acc']:.1%}")


@app.command("train-presence")
def train_presence(
    data: Path = typer.Option(..., help="Synthetic REFER folder (scenes.json, extra.json) to learn from (train split)."),
    out: Path = typer.Option(..., help="Output folder: OUT/model is the model with the presence head."),
    model: Optional[Path] = typer.Option(None, help="Checkpoint directory with a fusion locator (default: the "
                                                    "embedded shapes-tiny)."),
    epochs: int = typer.Option(30, min=1, help="Passes over the train phrases."),
    lr: float = typer.Option(1e-3, min=0.0, help="Peak learning rate (cosine)."),
    denied: float = typer.Option(0.01, min=0.0, max=0.5, help=(
        "The threshold is set so that this share of --eval-split's present phrases reads as absent.")),
    seed: int = typer.Option(0, help="Seed of the sampled phrases, the batch order and the initial weights."),
    eval_split: str = typer.Option("val", help="Split the threshold is chosen on."),
    augment: float = typer.Option(0.5, min=0.0, max=1.0, help="Share of the images that also give a corrupted "
                                                              "copy (noise, blur, lighting, JPEG)."),
    extra_data: list[Path] = typer.Option([], help="More synthetic folders whose train split is learnt too (repeat "
                                                   "the option); the threshold stays on --data."),
) -> None:
    """Give a model a presence head (is the phrase's object in the image?), trained on cached features."""
    from shapes.presence import train_presence as run

    report = run(_model_dir(model), data, out, epochs=epochs, lr=lr, denied=denied, seed=seed, eval_split=eval_split,
                 augment=augment, extra_data=extra_data)
    held = report[eval_split]
    console.print(f"model written to {out / 'model'}; {eval_split}: AUC {held['auc']:.3f}, present denied "
                  f"{held['present_denied']:.1%}, absent denied {held['absent_denied']:.1%} "
                  f"(threshold {report['threshold']:.3f})")


@app.command("train-region")
def train_region(
    data: Path = typer.Option(..., help="Synthetic REFER folder (scenes.json) to learn from (train split)."),
    out: Path = typer.Option(..., help="Output folder: OUT/model is the model with the region head."),
    model: Optional[Path] = typer.Option(None, help="Checkpoint directory (default: the embedded shapes-tiny)."),
    epochs: int = typer.Option(20, min=1, help="Passes over the train regions."),
    lr: float = typer.Option(1e-3, min=0.0, help="Peak learning rate (cosine)."),
    seed: int = typer.Option(0, help="Seed of the regions, the batch order and the initial weights."),
    augment: float = typer.Option(0.5, min=0.0, max=1.0, help="Share of the images that also give a corrupted "
                                                              "copy (noise, blur, lighting, JPEG)."),
    extra_data: list[Path] = typer.Option([], help="More synthetic folders whose train split is learnt too (repeat "
                                                   "the option); scores stay on --data."),
    verify_share: float = typer.Option(0.0, min=0.0, max=0.5, help=(
        "Then set the head's check of plain targets ('the cyan square'): the share of --data's val present objects "
        "it may drop (0: no check; needs the presence and locator add-ons).")),
) -> None:
    """Give a model a region head (what object is in a marked box or under a click?), trained on cached features."""
    from shapes.region_head import train_region_head

    report = train_region_head(_model_dir(model), data, out, epochs=epochs, lr=lr, seed=seed, augment=augment,
                               extra_data=extra_data)
    held = report["val"]
    console.print(f"model written to {out / 'model'}; val: colour and kind right {held['named']:.1%}, every "
                  f"attribute right {held['all']:.1%}")
    if verify_share > 0:
        from shapes.region_verify import set_verify

        checked = set_verify(out / "model", data, share=verify_share, seed=seed)
        (out / "region_verify.json").write_text(json.dumps(checked, indent=2))
        console.print(f"plain targets checked: verify {checked['verify']:.6f} ({verify_share:.1%} of "
                      f"{checked['phrases']} val present phrases under it)")


@app.command("train-mask-encoder")
def train_mask_encoder(
    data: Path = typer.Option(..., help="Synthetic REFER folder (scenes.json) to learn from (train split; val scores)."),
    out: Path = typer.Option(..., help="Output folder: OUT/model is the model with the new SAM image encoder."),
    model: Optional[Path] = typer.Option(None, help="Checkpoint directory (default: the embedded shapes-tiny)."),
    steps: int = typer.Option(1500, min=1, help="Optimizer steps."),
    batch_size: int = typer.Option(16, min=1, help="Views a step."),
    lr: float = typer.Option(3e-4, min=0.0, help="Peak learning rate (warm-up, cosine)."),
    augment: float = typer.Option(0.7, min=0.0, max=1.0, help="Share of the views corrupted (region by region, "
                                                              "then the whole image)."),
    zoom: float = typer.Option(0.5, min=0.0, max=1.0, help="Share of the views that are a crop around one object, "
                                                           "as mask_zoom decodes."),
    grey: float = typer.Option(0.2, min=0.0, max=1.0, help="Share of the views made grayscale (after any "
                                                            "corruption); 0 is v12's recipe."),
    camouflage: float = typer.Option(0.0, min=0.0, max=1.0, help="Share of the grey views whose objects are "
                                                                  "brought to their ground's brightness, on a "
                                                                  "blotchy ground (v15)."),
    grey_encoder: bool = typer.Option(False, "--grey-encoder", help="The trained weights read grayscale images "
                                                                    "only (the grey_encoder add-on); SAM's own "
                                                                    "encoder is kept."),
    seed: int = typer.Option(0, help="Seed of the views and the batch order."),
    extra_data: list[Path] = typer.Option([], help="More synthetic folders whose train split is learnt too (repeat "
                                                   "the option)."),
) -> None:
    """Train SAM's image encoder to read corrupted and zoomed views as the original reads clean ones (every other
    weight kept)."""
    from shapes.mask_robust import train_mask_encoder as run

    report = run(_model_dir(model), data, out, extra_data=extra_data, steps=steps, batch_size=batch_size, lr=lr,
                 augment=augment, grey=grey, camouflage=camouflage, grey_encoder=grey_encoder, zoom=zoom,
                 seed=seed)
    before, after = report["before"], report["after"]
    console.print(f"model written to {out / 'model'}; SAM from each val object's box, mean IoU: clean views "
                  f"{before['clean']:.3f} -> {after['clean']:.3f}, corrupted {before['seen']:.3f} -> {after['seen']:.3f}"
                  f", grey {before['grey']:.3f} -> {after['grey']:.3f}, grey camouflaged {before['camouflaged']:.3f} -> "
                  f"{after['camouflaged']:.3f}")


@app.command("train-grey-tower")
def train_grey_tower(
    data: Path = typer.Option(..., help="Synthetic REFER folder (scenes.json) to learn from (train split; val scores)."),
    out: Path = typer.Option(..., help="Output folder: OUT/model is the model with the grey_tower add-on."),
    model: Optional[Path] = typer.Option(None, help="Checkpoint directory (default: the embedded shapes-tiny)."),
    steps: int = typer.Option(1500, min=1, help="Optimizer steps."),
    batch_size: int = typer.Option(16, min=1, help="Scenes a step."),
    lr: float = typer.Option(1e-3, min=0.0, help="Peak learning rate (warm-up, cosine)."),
    augment: float = typer.Option(0.5, min=0.0, max=1.0, help="Share of the scenes corrupted before they are made "
                                                              "grey."),
    camouflage: float = typer.Option(0.3, min=0.0, max=1.0, help="Share of the grey views whose objects are brought "
                                                                  "to their ground's brightness, on a blotchy ground."),
    seed: int = typer.Option(0, help="Seed of the views and the batch order."),
    extra_data: list[Path] = typer.Option([], help="More synthetic folders whose train split is learnt too (repeat "
                                                   "the option)."),
) -> None:
    """Train the vision tower's patch embedding for grayscale images (the grey_tower add-on; every other weight
    kept): the tower's features of grey views regressed on its features of the colour scenes."""
    from shapes.grey_tower import train_grey_tower as run

    report = run(_model_dir(model), data, out, extra_data=extra_data, steps=steps, batch_size=batch_size, lr=lr,
                 augment=augment, camouflage=camouflage, seed=seed)
    before, after = report["before"], report["after"]
    console.print(f"model written to {out / 'model'}; the region head on val objects' boxes, kinds read right: grey "
                  f"views {before['grey views']['kind']:.3f} -> {after['grey views']['kind']:.3f}, colour views "
                  f"{before['colour views']['kind']:.3f} -> {after['colour views']['kind']:.3f}")


@app.command("train-silhouette")
def train_silhouette(
    data: Path = typer.Option(..., help="Synthetic REFER folder (scenes.json) to learn from (train split; val scores "
                                        "and the check's level)."),
    out: Path = typer.Option(..., help="Output folder: OUT/model is the model with the silhouette add-on."),
    model: Optional[Path] = typer.Option(None, help="Checkpoint directory with a region head (default: the embedded "
                                                    "shapes-tiny)."),
    steps: int = typer.Option(1500, min=1, help="Optimizer steps (256 masks each)."),
    lr: float = typer.Option(2e-3, min=0.0, help="Peak learning rate (warm-up, cosine)."),
    decoded_scenes: int = typer.Option(1000, min=0, help="Train scenes of the last folder whose objects the model "
                                                         "decodes from their boxes, to learn from its masks too."),
    share: float = typer.Option(0.02, min=0.0, max=0.5, help="The check's level: this share of the masks of the "
                                                             "right answers to val's present plain phrases fall "
                                                             "under it."),
    seed: int = typer.Option(0, help="Seed of the masks' roughening, the batch order and the initial weights."),
    extra_data: list[Path] = typer.Option([], help="More synthetic folders whose train split is learnt too (repeat "
                                                   "the option)."),
) -> None:
    """Give a model a check of the kind its plain targets' masks have, read from their silhouettes by a small
    network (the silhouette add-on; every other weight kept)."""
    from shapes.silhouette_kind import train_silhouette_addon

    report = train_silhouette_addon(_model_dir(model), data, out, extra_data=extra_data,
                                    decoded_scenes=decoded_scenes, steps=steps, lr=lr, seed=seed, share=share)
    val = report["val"]
    console.print(f"model written to {out / 'model'}; val kinds read right: true masks {val['true masks']:.1%}, "
                  f"decoded masks {val['decoded masks']:.1%}; level {report['calibration']['level']:.4f}")


@app.command("video-eval")
def video_eval(
    data: Path = typer.Option(..., help="Folder of videos (videos.json); generated when missing."),
    videos: int = typer.Option(20, min=1, help="Videos to generate when --data has none."),
    seed: int = typer.Option(123, help="Seed of the generated videos."),
    model: Optional[Path] = typer.Option(None, help="Checkpoint directory (default: the embedded shapes-tiny)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:1 ..."),
    source: str = typer.Option("question", help="question (the VLM's answer, carried) or box (click-to-track from "
                                                "the ground-truth box)."),
    mode: str = typer.Option("auto", help="auto, memory, reask or carry (see grounding/video/predict.py)."),
    every: Optional[int] = typer.Option(None, min=0, help="reask: ask the VLM every N frames."),
    margin: Optional[float] = typer.Option(None, min=0.0, help="carry: box growth per side."),
    addon: Optional[list[str]] = typer.Option(None, "--addon", help=ADDON_HELP),
    out: Optional[Path] = typer.Option(None, help="Also write the full report (JSON) here."),
) -> None:
    """Region similarity J of the video path on synthetic moving-shape videos (grounding/video/evaluate.py)."""
    import json

    from grounding import Grounder
    from grounding.result import atomic_write_text
    from grounding.video.evaluate import evaluate_videos
    from shapes.scenes.synthetic_video import generate_video_dataset

    if source not in ("question", "box"):
        raise PromptError(f"--source must be question or box, got {source!r}")
    if not (data / "videos.json").is_file():
        generate_video_dataset(data, videos, seed)
    grounder = Grounder.from_pretrained(_model_dir(model), device=device, addons=parse_addon_options(addon))
    options = {k: v for k, v in (("mode", mode), ("every", every), ("margin", margin)) if v is not None}
    if source == "box":
        options.pop("every", None)
    report = evaluate_videos(grounder, data, source=source, **options)
    console.print(f"J {report['J']:.3f} (key frame {report['J_key']:.3f}, other frames {report['J_after_key']:.3f}) "
                  f"over {report['tracks']} tracks in {report['videos']} videos, source {source}, options {options}, "
                  f"{report['seconds']} s")
    if out is not None:
        atomic_write_text(out, json.dumps(report, indent=2))


@app.command("patch-eval")
def patch_eval(
    run: Path = typer.Option(..., help="A stage-0 output folder (model/ and patch_heads.safetensors)."),
    data: Path = typer.Option(..., help="A synthetic REFER folder (with scenes.json)."),
    split: str = typer.Option("val", help="Split to score."),
    limit: Optional[int] = typer.Option(None, min=1, help="First N images only."),
) -> None:
    """What the default model's vision tower knows per patch: stage 0's heads scored on a synthetic split."""
    import json

    from shapes.patch_eval import evaluate_patches

    typer.echo(json.dumps(evaluate_patches(run, data, split, limit), indent=2))


def _register_eval() -> None:
    from apps.eval_cmd import eval_command
    app.command("eval", help="Evaluate on a REFER folder (RefCOCO/+/g or synthetic): cIoU, gIoU, Acc@0.5.")(eval_command)


_register_eval()


def _register_annotate() -> None:
    from apps.annotate import annotate_command
    app.command("annotate", help="Annotate a folder of images for a list of prompts: COCO, YOLO-seg or LabelMe "
                                 "files with masks; resumable, --num-procs N shards.")(annotate_command)


_register_annotate()


def _register_demo() -> None:
    @app.command("demo")
    def demo(
        model: Optional[Path] = typer.Option(None, help="Checkpoint directory (default: the embedded shapes-tiny)."),
        host: str = typer.Option("127.0.0.1", help="Address to bind; 0.0.0.0 exposes the app to the network."),
        port: int = typer.Option(7860, min=1, max=65535, help="Port to listen on."),
        device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:1 ..."),
        max_new_tokens: int = typer.Option(256, min=1, max=1024, help="Default longest answer (the page has a slider)."),
        max_file_size: str = typer.Option("25mb", help="Largest upload, e.g. 25mb, 1gb."),
        quantize: Optional[str] = typer.Option(None, help="4bit or 8bit: the language model through bitsandbytes "
                                                          "(CUDA only)."),
    ) -> None:
        """Web app: questions, clicks and boxes on an image; API endpoints /segment, /click, /ground."""
        from apps.demo import serve
        serve(_model_dir(model), host=host, port=port, device=device, max_new_tokens=max_new_tokens,
              max_file_size=max_file_size, quantize=quantize)


_register_demo()


def _register_convert() -> None:
    from apps.convert_cmd import convert_app
    app.add_typer(convert_app, name="convert")


_register_convert()


def _print_video(run, paths) -> None:
    stdout = Console()
    if run.key_prediction is not None:
        stdout.print(f"[bold]answer on frame {run.key_frame}:[/bold] {run.key_prediction.answer}", markup=True,
                     highlight=False)
    info = run.info
    stdout.print(f"  {info.num_frames} frames, {info.width}x{info.height}, {info.fps:.2f} fps, mode {run.mode}",
                 highlight=False)
    for obj_id, phrase in sorted(run.objects.items()):
        stdout.print(f"  object {obj_id}: {phrase or '-'}", highlight=False)
    for note in run.notes:
        stdout.print(f"  note: {note}", highlight=False)
    stdout.print(f"wrote {paths['frames']}, {paths['overlay']} and {paths['summary']}", highlight=False)


def _print_result(result, out: Path, overlay: Optional[Path]) -> None:
    stdout = Console()
    if result.answer:
        stdout.print(f"[bold]answer:[/bold] {result.answer}", markup=True, highlight=False)
    for i, t in enumerate(result.targets):
        box = "none" if t.box is None else "(" + ", ".join(f"{v:.1f}" for v in t.box) + ")"
        area = 0 if t.mask is None else int(t.mask.sum())
        stdout.print(f"  target {i}: {t.phrase or '-'}  box {box}  mask area {area} px", highlight=False)
    for note in result.notes:
        stdout.print(f"  note: {note}", highlight=False)
    stdout.print(f"wrote {out}" + (f" and {overlay}" if overlay else ""), highlight=False)


def _fail(message: str, code: int) -> None:
    """One line on stderr (never wrapped, whatever the terminal width), then exit."""
    sys.stderr.write(" ".join(message.split()) + "\n")
    sys.exit(code)


def main() -> None:
    try:
        app(standalone_mode=False)
    except GroundsegError as err:
        _fail(f"error: {err}", 2)
    except (typer.Exit, typer.Abort) as err:
        sys.exit(getattr(err, "exit_code", 1))
    except Exception as err:  # usage errors (typer's own click) and the unexpected
        if hasattr(err, "show") and hasattr(err, "exit_code"):
            err.show()
            sys.exit(err.exit_code)
        if os.environ.get("GROUNDSEG_DEBUG"):
            raise
        _fail(f"error: {type(err).__name__}: {err} (set GROUNDSEG_DEBUG=1 for the traceback)", 1)


if __name__ == "__main__":
    main()
