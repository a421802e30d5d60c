"""The web app (``groundseg demo``): Gradio Blocks around :mod:`apps.demo_handlers`.

Layout: one tab per task, each built by a function ``build(ctx: DemoContext)`` listed in :data:`TABS` (Image:
:mod:`apps.demo_handlers`; Video: :mod:`apps.demo_video`), plus named API endpoints for ``gradio_client`` that
take files and plain values:

    /segment  (image, points, point_labels, boxes)                          -> result JSON (mask decoder only)
    /click    (image, x, y, label)                                          -> result JSON (one click)
    /ground   (image, question, max_new_tokens, points, point_labels, boxes) -> result JSON (answer + masks)
    /ground_video (video, question, key_frame, max_new_tokens)              -> (overlay.mp4, video JSON)
    /track_video  (video, frame_index, points, point_labels, box)           -> (overlay.mp4, video JSON)

(video JSON: ``{"video": video.json, "frames": [one frames.jsonl line per frame]}``, see grounding/video/predict.py.)
The API takes its image or video through a ``gr.File`` component, not ``gr.api``'s raw dicts: Gradio then checks
that the uploaded path is one of its own uploads, so a client cannot name an arbitrary server file.

Serving: loopback by default; one model call at a time (all model events share the queue's concurrency group
"model" with limit 1; the Grounder is not thread-safe); an upload size limit; only examples/ is readable
besides Gradio's own upload and result files; errors reach the page as one readable line.
"""
from __future__ import annotations

import dataclasses
import shutil
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import gradio as gr
from gradio_image_annotation import image_annotator

from apps.demo_handlers import COLOR_MAP, MAX_NEW_TOKENS_LIMIT, MODES, DemoHandlers, DownloadFolder, ModelService
from apps.demo_video import VideoHandlers

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"
MODEL_CONCURRENCY = "model"
QUEUE_MAX_SIZE = 256
DEFAULT_MAX_FILE_SIZE = "25mb"

_INTRO = (
    "### groundseg\n"
    "Ask a question about an image: each object the answer names gets a box and a mask, in the colour of its "
    "phrase. Or click on the result image (object / background points), or drag a box on the image, for a mask "
    "from the mask decoder alone; **Ask about this region** writes your clicks and box into the question. "
    "The **Video** tab asks about one frame, or tracks what you click on it, through the whole video."
)
MASK_THRESHOLD_RANGE = (-4.0, 4.0, 0.5)  # slider min, max, step (decoder logits; 0.0 = probability 0.5)


@dataclass
class DemoContext:
    """What a tab builder needs: the handlers (with the model service) and the example images and videos."""

    handlers: DemoHandlers
    examples: list[Path]
    video: VideoHandlers | None = None
    video_examples: list[Path] = dataclasses.field(default_factory=list)

    @property
    def service(self) -> ModelService:
        return self.handlers.service


def _model_event(**kwargs) -> dict:
    """Event options of a UI action that runs the model: queued in the shared group of one, hidden from the API."""
    return dict(concurrency_id=MODEL_CONCURRENCY, concurrency_limit=1, api_visibility="private", **kwargs)


def image_tab(ctx: DemoContext) -> None:
    """Upload / example and box drawing (gradio_image_annotation), question, clicks on the result image,
    settings, downloads."""
    h = ctx.handlers
    session = gr.State(None)
    with gr.Row():
        with gr.Column(scale=1):
            # Upload here, and drag on it to draw a box (one; drag again to replace it, select + Delete to remove).
            image = image_annotator(label="Image (drag on it to draw a box)", image_type="filepath", single_box=True,
                                    disable_edit_boxes=True, show_remove_button=True, box_min_size=4,
                                    sources=["upload", "clipboard"], height=360, elem_id="input-image")
            if ctx.examples:
                gr.Examples(examples=[[{"image": str(p), "boxes": []}] for p in ctx.examples], inputs=[image],
                            label="Examples")
            question = gr.Textbox(label="Question", placeholder="Where is the red circle?", lines=1,
                                  elem_id="question")
            with gr.Row():
                ask = gr.Button("Ask", variant="primary", elem_id="ask")
                ask_region = gr.Button("Ask about this region", elem_id="ask-region")
            mode = gr.Radio([(label, key) for key, label in MODES.items()], value="positive", label="Click mode",
                            elem_id="click-mode")
            clear = gr.Button("Clear clicks and box", elem_id="clear")
            with gr.Accordion("Settings", open=False):
                max_new_tokens = gr.Slider(1, MAX_NEW_TOKENS_LIMIT, value=h.default_max_new_tokens, step=1,
                                           label="Max new tokens")
                low, high, step = MASK_THRESHOLD_RANGE
                threshold = gr.Slider(low, high, value=ctx.service.grounder.mask_threshold, step=step,
                                      label="Mask threshold (logit)", elem_id="mask-threshold",
                                      info="A pixel is in the mask when the decoder's logit is above this: "
                                           "higher = tighter masks. 0 = probability 0.5.")
                targets = gr.CheckboxGroup([], value=[], label="Targets to show", type="value",
                                           elem_id="targets")
        with gr.Column(scale=1):
            overlay = gr.Image(label="Result (click here)", type="numpy", format="png", interactive=False,
                               height=420, elem_id="overlay")
            answer = gr.HighlightedText(label="Answer", color_map=COLOR_MAP, show_legend=False,
                                        combine_adjacent=False, elem_id="answer")
            status = gr.Markdown(elem_id="status")
            downloads = gr.File(label="Download: result JSON (masks as COCO RLE) and masks as PNG (zip)",
                                file_count="multiple", interactive=False, elem_id="downloads")
    view = [session, overlay, answer, status, targets, downloads]
    image.change(h.on_input, [session, image, threshold], view, **_model_event())
    overlay.select(h.on_click, [session, mode, threshold], view, **_model_event())
    for trigger in (ask.click, question.submit):
        trigger(h.on_ask, [session, question, max_new_tokens, threshold], view, **_model_event())
    ask_region.click(h.on_ask_region, [session, question, max_new_tokens, threshold], view, **_model_event())
    threshold.release(h.on_threshold, [session, threshold], view, **_model_event())
    clear.click(h.on_clear, [session], view + [image], **_model_event())
    targets.input(h.on_targets, [session, targets], view, api_visibility="private")


def video_tab(ctx: DemoContext) -> None:
    """Upload / example video, frame slider, the shown frame (click on it), question or Track, the overlay video,
    the key frame's answer, downloads."""
    v = ctx.video
    session = gr.State(None)
    with gr.Row():
        with gr.Column(scale=1):
            # include_audio: no ffmpeg re-encode of uploads (the app reads videos with PyAV, audio is ignored).
            video = gr.Video(label="Video", sources=["upload"], include_audio=True, height=260,
                             elem_id="input-video")
            if ctx.video_examples:
                gr.Examples(examples=[[str(p)] for p in ctx.video_examples], inputs=[video], label="Examples")
            index = gr.Slider(0, 1, value=0, step=1, label="Frame (the key frame of a question or a track)",
                              interactive=False, elem_id="video-frame-index")
            frame = gr.Image(label="Frame (click here)", type="numpy", format="png", interactive=False, height=300,
                             elem_id="video-frame")
            question = gr.Textbox(label="Question about this frame", placeholder="Please segment the red circle.",
                                  lines=1, elem_id="video-question")
            with gr.Row():
                ask = gr.Button("Ask and track", variant="primary", elem_id="video-ask")
                track = gr.Button("Track the clicked object", elem_id="video-track")
            mode = gr.Radio([(label, key) for key, label in MODES.items()], value="positive", label="Click mode",
                            elem_id="video-click-mode")
            clear = gr.Button("Clear clicks", elem_id="video-clear")
            with gr.Accordion("Settings", open=False):
                max_new_tokens = gr.Slider(1, MAX_NEW_TOKENS_LIMIT, value=v.default_max_new_tokens, step=1,
                                           label="Max new tokens")
        with gr.Column(scale=1):
            result = gr.Video(label="Result (overlay.mp4)", interactive=False, loop=True, elem_id="video-result")
            answer = gr.HighlightedText(label="Answer on the key frame", color_map=COLOR_MAP, show_legend=False,
                                        combine_adjacent=False, elem_id="video-answer")
            status = gr.Markdown(elem_id="video-status")
            downloads = gr.File(label="Download: frames.jsonl (masks as COCO RLE, one line per frame) and video.json",
                                file_count="multiple", interactive=False, elem_id="video-downloads")
    view = [session, frame, result, answer, status, downloads]
    # Reading a frame needs no model: these two run outside the model's queue group.
    video.change(v.on_video, [session, video], view + [index], api_visibility="private")
    index.change(v.on_frame, [session, index], view, trigger_mode="always_last", api_visibility="private")
    frame.select(v.on_click, [session, mode], view, **_model_event())
    for trigger in (ask.click, question.submit):
        trigger(v.on_ask, [session, question, max_new_tokens], view, **_model_event())
    track.click(v.on_track, [session], view, **_model_event())
    clear.click(v.on_clear, [session], view, api_visibility="private")


def api_endpoints(ctx: DemoContext) -> None:
    """The named endpoints; their inputs live in a hidden column (the page never shows them)."""
    h = ctx.handlers
    with gr.Column(visible=False):
        file = gr.File(label="image", type="filepath")
        points = gr.JSON(label="points")          # [[x, y], ...] pixels
        labels = gr.JSON(label="point_labels")    # [1, 0, ...]
        boxes = gr.JSON(label="boxes")            # [[x1, y1, x2, y2], ...] pixels
        x, y = gr.Number(label="x"), gr.Number(label="y")
        label = gr.Number(value=1, label="label", precision=0)
        question = gr.Textbox(label="question")
        tokens = gr.Number(value=h.default_max_new_tokens, label="max_new_tokens", precision=0)
        result = gr.JSON(label="result")
        triggers = {name: gr.Button(name) for name in ("segment", "click", "ground")}  # never shown or pressed
    endpoints = {
        "segment": (h.api_segment, [file, points, labels, boxes]),
        "click": (h.api_click, [file, x, y, label]),
        "ground": (h.api_ground, [file, question, tokens, points, labels, boxes]),
    }
    for name, (fn, inputs) in endpoints.items():
        triggers[name].click(fn, inputs, result, api_name=name, concurrency_id=MODEL_CONCURRENCY, concurrency_limit=1)
    if ctx.video is None:
        return
    v = ctx.video
    with gr.Column(visible=False):
        video = gr.File(label="video", type="filepath")
        frame_index = gr.Number(value=0, label="frame_index", precision=0)
        key_frame = gr.Number(value=0, label="key_frame", precision=0)
        box = gr.JSON(label="box")                # [x1, y1, x2, y2] pixels
        overlay = gr.File(label="overlay")        # overlay.mp4
        video_result = gr.JSON(label="video_result")
        video_triggers = {name: gr.Button(name) for name in ("ground_video", "track_video")}
    video_endpoints = {
        "ground_video": (v.api_ground_video, [video, question, key_frame, tokens]),
        "track_video": (v.api_track_video, [video, frame_index, points, labels, box]),
    }
    for name, (fn, inputs) in video_endpoints.items():
        video_triggers[name].click(fn, inputs, [overlay, video_result], api_name=name,
                                   concurrency_id=MODEL_CONCURRENCY, concurrency_limit=1)


TabBuilder = Callable[[DemoContext], None]
TABS: list[tuple[str, TabBuilder]] = [("Image", image_tab), ("Video", video_tab)]


def build_app(grounder, *, examples_dir: Path | None = EXAMPLES_DIR, download_dir: Path | None = None,
              max_new_tokens: int = 128, tabs: Sequence[tuple[str, TabBuilder]] | None = None) -> gr.Blocks:
    """The Blocks app around ``grounder`` (a :class:`~grounding.Grounder`), queue configured."""
    owned = download_dir is None
    if owned:
        download_dir = Path(tempfile.mkdtemp(prefix="groundseg-demo-"))
    service, downloads = ModelService(grounder), DownloadFolder(download_dir)
    handlers = DemoHandlers(service, downloads, max_new_tokens)
    videos = VideoHandlers(service, downloads, max_new_tokens)
    has_examples = examples_dir is not None and examples_dir.is_dir()
    found = lambda pattern: sorted(examples_dir.glob(pattern)) if has_examples else []
    ctx = DemoContext(handlers, found("*.png"), videos, found("*.mp4"))
    # delete_cache: Gradio's copies of uploads and results older than an hour go, checked hourly.
    with gr.Blocks(title="groundseg", analytics_enabled=False, delete_cache=(3600, 3600)) as app:
        gr.Markdown(_INTRO)
        with gr.Tabs():
            for title, build in (TABS if tabs is None else tabs):
                with gr.Tab(title):
                    build(ctx)
        api_endpoints(ctx)
    app.queue(max_size=QUEUE_MAX_SIZE, default_concurrency_limit=1)
    app.groundseg_context = ctx  # for tests and for tabs added later
    if owned:  # our result files go with the app (Gradio serves its own copies)
        weakref.finalize(app, shutil.rmtree, download_dir, True)
    return app


def launch_options(host: str = "127.0.0.1", port: int | None = 7860,
                   max_file_size: str | int = DEFAULT_MAX_FILE_SIZE, examples_dir: Path | None = EXAMPLES_DIR) -> dict:
    """``Blocks.launch`` keyword arguments: what the server binds to and what it lets anyone read."""
    return dict(
        server_name=host,
        server_port=port,
        max_file_size=max_file_size,
        # Only the examples besides Gradio's own uploads and results; nothing else on the disk.
        allowed_paths=[str(examples_dir)] if examples_dir is not None else [],
        show_error=True,  # gr.Error messages; every handler turns other exceptions into one generic line
        ssr_mode=False,   # no Node server
        share=False,
        enable_monitoring=False,
        mcp_server=False,
        footer_links=["api"],
    )


def serve(model: Path, host: str = "127.0.0.1", port: int = 7860, device: str = "auto",
          max_new_tokens: int = 128, max_file_size: str | int = DEFAULT_MAX_FILE_SIZE) -> None:
    """Load the model and serve the app until interrupted."""
    from grounding import Grounder

    grounder = Grounder.from_pretrained(model, device=device, max_new_tokens=max_new_tokens)
    app = build_app(grounder, max_new_tokens=max_new_tokens)
    app.launch(**launch_options(host, port, max_file_size))
