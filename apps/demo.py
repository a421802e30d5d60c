"""The web app (``groundseg demo``): Gradio Blocks around :mod:`apps.demo_handlers`.

Layout: one tab per task, each built by a function ``build(ctx: DemoContext)`` listed in :data:`TABS` (Image:
:mod:`apps.demo_handlers`; Video: :mod:`apps.demo_video`), plus named API endpoints for ``gradio_client`` that
take files and plain values:

    /segment  (image, points, point_labels, boxes[, objects])               -> result JSON (mask decoder only)
    /click    (image, x, y, label)                                          -> result JSON (one click)
    /ground   (image, question, max_new_tokens, points, point_labels, boxes) -> result JSON (answer + masks)
    /ground_video (video, question, key_frame, max_new_tokens)              -> (overlay.mp4, video JSON)
    /track_video  (video, frame_index, points, point_labels, box[, objects]) -> (overlay.mp4, video JSON)

(``objects``: ``[{"points": [[x, y], ...], "point_labels": [1, 0, ...], "box": [x1, y1, x2, y2]}, ...]``, one
mask or track per object, in place of the single object's points / point_labels / box.)

(video JSON: ``{"video": video.json, "frames": [one frames.jsonl line per frame]}``, see grounding/video/predict.py.)
The API takes its image or video through a ``gr.File`` component, not ``gr.api``'s raw dicts: Gradio then checks
that the uploaded path is one of its own uploads, so a client cannot name an arbitrary server file.

Serving: loopback by default; one model call at a time (all model events share the queue's concurrency group
"model" with limit 1; the Grounder is not thread-safe); an upload size limit; only examples/ is readable
besides Gradio's own upload and result files; errors reach the page as one readable line.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import gradio as gr

from apps.demo_handlers import COLOR_MAP, MAX_NEW_TOKENS_LIMIT, MODES, DemoHandlers, DownloadFolder, ModelService
from apps.demo_inputs import image_input
from apps.demo_video import VideoHandlers

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"
MODEL_CONCURRENCY = "model"
QUEUE_MAX_SIZE = 256
DEFAULT_MAX_FILE_SIZE = "25mb"

_INTRO = (
    "**groundseg** · Click on the result (object + / background -) or drag a box on the image: a mask per object "
    "(**New object** for the next one). Or ask a question: each object the answer names becomes an object. "
    "The **Video** tab tracks them through a video."
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


def _ui_event(model: bool = True, **kwargs) -> dict:
    """Event options of a page action. ``model``: it changes the tab's session, so it queues in the model's group
    of one (events of one tab then run in the order they were triggered, and a later event never overwrites an
    earlier one's result with an older session). Progress shows as a timer on the status line only: the result
    image, answer and downloads stay on screen while the model works."""
    options = dict(api_visibility="private", show_progress="minimal")
    if model:
        options.update(concurrency_id=MODEL_CONCURRENCY, concurrency_limit=1)
    return {**options, **kwargs}


def example_questions(images: list[Path]) -> dict[Path, list[str]]:
    """Per example image, the questions ``questions.json`` beside it lists (one empty question where none)."""
    listed: dict = {}
    if images and (images[0].parent / "questions.json").is_file():
        listed = json.loads((images[0].parent / "questions.json").read_text())
    return {p: listed.get(p.name) or [""] for p in images}


def image_tab(ctx: DemoContext) -> None:
    """Left: the image (drag on it for a box), click mode, objects (new, undo, redo, clear), question, settings.
    Right: the result image (click here), status, answer, downloads."""
    h = ctx.handlers
    session = gr.State(None)
    with gr.Row(equal_height=False):
        with gr.Column(scale=1, min_width=360):
            # Upload here, and drag on it to draw the current object's box (each drag: a new box).
            # single_box=False: with True the input turns to its move-a-box mode after one box, and the next drag
            # moves or resizes that box instead of drawing a new one (the handler empties the input's boxes).
            image = image_input(label="Image (drag on it to draw a box)", image_type="filepath", single_box=False,
                                disable_edit_boxes=True, show_remove_button=False, box_min_size=4,
                                sources=["upload", "clipboard"], height=300, elem_id="input-image")
            with gr.Row():
                question = gr.Textbox(label="Question", placeholder="Please segment the circle.", lines=1, scale=3,
                                      elem_id="question")
                with gr.Column(scale=1, min_width=100):
                    ask = gr.Button("Ask", variant="primary", size="sm", elem_id="ask")
                    ask_region = gr.Button("Ask about this object", size="sm", elem_id="ask-region")
            if ctx.examples:   # each example image with the questions that work on it (examples/questions.json)
                asked = example_questions(ctx.examples)
                gr.Examples(examples=[[{"image": str(p), "boxes": []}, q] for p in ctx.examples for q in asked[p]],
                            inputs=[image, question], label="Examples")
            with gr.Accordion("Settings", open=False):
                max_new_tokens = gr.Slider(1, MAX_NEW_TOKENS_LIMIT, value=h.default_max_new_tokens, step=1,
                                           label="Max new tokens")
                low, high, step = MASK_THRESHOLD_RANGE
                threshold = gr.Slider(low, high, value=ctx.service.grounder.mask_threshold, step=step,
                                      label="Mask threshold (logit)", elem_id="mask-threshold",
                                      info="A pixel is in the mask when the decoder's logit is above this: "
                                           "higher = tighter masks. 0 = probability 0.5.")
        with gr.Column(scale=1, min_width=360, elem_id="result-column"):
            with gr.Row(elem_id="object-tools"):
                mode = gr.Radio([(label, key) for key, label in MODES.items()], value="positive", show_label=False,
                                container=False, scale=2, min_width=260, elem_id="click-mode")
                undo = gr.Button("Undo", size="sm", min_width=50, elem_id="undo")
                redo = gr.Button("Redo", size="sm", min_width=50, elem_id="redo")
            overlay = gr.Image(label="Result (click here)", type="numpy", format="png", interactive=False,
                               height=430, elem_id="overlay")
            status = gr.Markdown(elem_id="status")
            with gr.Row():
                new_object = gr.Button("New object", size="sm", min_width=60, elem_id="new-object")
                clear_object = gr.Button("Clear object", size="sm", min_width=60, elem_id="clear-object")
                clear = gr.Button("Clear all", size="sm", min_width=50, elem_id="clear")
            objects = gr.Radio([], label="Objects (clicks and boxes go to the chosen one)", elem_id="objects")
            answer = gr.HighlightedText(label="Answer", color_map=COLOR_MAP, show_legend=False,
                                        combine_adjacent=False, elem_id="answer")
            downloads = gr.File(label="Downloads: result JSON (every mask as COCO RLE), all masks (zip), one PNG "
                                      "per object", file_count="multiple", interactive=False, elem_id="downloads")
    view = [session, overlay, answer, status, objects]
    masks = lambda: dict(fn=h.on_masks, inputs=[session, threshold], outputs=view, **_ui_event(show_progress_on=status))
    files = lambda: dict(fn=h.on_downloads, inputs=[session], outputs=downloads,
                         **_ui_event(model=False, concurrency_id="downloads", concurrency_limit=1,
                                     show_progress="hidden"))

    def then_mask(event) -> None:
        event.success(**masks()).success(**files())

    then_mask(image.change(h.on_input, [session, image], view + [image], **_ui_event(show_progress_on=status)))
    # A click is drawn at once (no model), then the decoder runs, then the downloads are written.
    then_mask(overlay.select(h.on_click, [session, mode], view, **_ui_event(show_progress="hidden")))
    for button, fn in ((undo, h.on_undo), (redo, h.on_redo), (clear_object, h.on_clear_object)):
        then_mask(button.click(fn, [session], view, **_ui_event(show_progress="hidden")))
    new_object.click(h.on_new_object, [session], view, **_ui_event(show_progress="hidden"))
    objects.input(h.on_select, [session, objects], view, **_ui_event(show_progress="hidden"))
    then_mask(clear.click(h.on_clear_all, [session], view + [image], **_ui_event(show_progress="hidden")))
    # .change: a slider drag and a number typed in its box (Enter or leaving the box) alike.
    then_mask(threshold.change(h.on_threshold, [session, threshold], view, trigger_mode="always_last",
                               **_ui_event(show_progress="hidden")))
    for trigger in (ask.click, question.submit):
        trigger(h.on_ask, [session, question, max_new_tokens, threshold], view,
                **_ui_event(show_progress_on=status)).success(**files())
    ask_region.click(h.on_ask_region, [session, question, max_new_tokens, threshold], view,
                     **_ui_event(show_progress_on=status)).success(**files())


def video_tab(ctx: DemoContext) -> None:
    """Left: the video, the frame slider, question / Ask, Track, click tools, objects. Right: the shown frame
    (click here), the overlay video, the key frame's answer, status, downloads."""
    v = ctx.video
    session = gr.State(None)
    with gr.Row(equal_height=False):
        with gr.Column(scale=1, min_width=360):
            # include_audio: no ffmpeg re-encode of uploads (the app reads videos with PyAV, audio is ignored).
            video = gr.Video(label="Video", sources=["upload"], include_audio=True, height=220,
                             elem_id="input-video")
            index = gr.Slider(0, 1, value=0, step=1, label="Frame (the key frame of a question or a track)",
                              interactive=False, elem_id="video-frame-index")
            with gr.Row():
                question = gr.Textbox(label="Question about this frame", placeholder="Please segment the circle.",
                                      lines=1, scale=3, elem_id="video-question")
                with gr.Column(scale=1, min_width=100):
                    ask = gr.Button("Ask and track", variant="primary", size="sm", elem_id="video-ask")
                    track = gr.Button("Track the clicked objects", variant="primary", size="sm",
                                      elem_id="video-track")
            with gr.Row():
                mode = gr.Radio([(label, key) for key, label in MODES.items()], value="positive", show_label=False,
                                container=False, scale=2, min_width=260, elem_id="video-click-mode")
                new_object = gr.Button("New object", size="sm", min_width=60, elem_id="video-new-object")
                undo = gr.Button("Undo", size="sm", min_width=50, elem_id="video-undo")
                clear = gr.Button("Clear", size="sm", min_width=50, elem_id="video-clear")
            objects = gr.Radio([], label="Objects (clicks go to the chosen one; each is tracked on its own)",
                               elem_id="video-objects")
            if ctx.video_examples:
                gr.Examples(examples=[[str(p)] for p in ctx.video_examples], inputs=[video], label="Examples")
            with gr.Accordion("Settings", open=False):
                max_new_tokens = gr.Slider(1, MAX_NEW_TOKENS_LIMIT, value=v.default_max_new_tokens, step=1,
                                           label="Max new tokens")
        with gr.Column(scale=1, min_width=360):
            frame = gr.Image(label="Frame (click here)", type="numpy", format="png", interactive=False, height=320,
                             elem_id="video-frame")
            status = gr.Markdown(elem_id="video-status")
            result = gr.Video(label="Result (overlay.mp4)", interactive=False, loop=True, height=260,
                              elem_id="video-result")
            answer = gr.HighlightedText(label="Answer on the key frame", color_map=COLOR_MAP, show_legend=False,
                                        combine_adjacent=False, elem_id="video-answer")
            downloads = gr.File(label="Download: frames.jsonl (masks as COCO RLE, one line per frame) and video.json",
                                file_count="multiple", interactive=False, elem_id="video-downloads")
    view = [session, frame, result, answer, status, downloads, objects]
    # Reading a frame needs no model: these run outside the model's queue group.
    video.change(v.on_video, [session, video], view + [index, video],
                 **_ui_event(model=False, show_progress_on=status))
    index.change(v.on_frame, [session, index], view, trigger_mode="always_last",
                 **_ui_event(model=False, show_progress="hidden"))
    frame.select(v.on_click, [session, mode], view, **_ui_event(show_progress_on=status))
    for trigger in (ask.click, question.submit):
        trigger(v.on_ask, [session, question, max_new_tokens], view, **_ui_event(show_progress_on=status))
    track.click(v.on_track, [session], view, **_ui_event(show_progress_on=status))
    for button, fn in ((new_object, v.on_new_object), (undo, v.on_undo), (clear, v.on_clear)):
        button.click(fn, [session], view, **_ui_event(show_progress="hidden"))
    objects.input(v.on_select, [session, objects], view, **_ui_event(show_progress="hidden"))


def api_endpoints(ctx: DemoContext) -> None:
    """The named endpoints; their inputs live in a hidden column (the page never shows them)."""
    h = ctx.handlers
    with gr.Column(visible=False):
        file = gr.File(label="image", type="filepath")
        points = gr.JSON(label="points")          # [[x, y], ...] pixels
        labels = gr.JSON(label="point_labels")    # [1, 0, ...]
        boxes = gr.JSON(label="boxes")            # [[x1, y1, x2, y2], ...] pixels
        objects = gr.JSON(value=None, label="objects")  # [{"points", "point_labels", "box"}, ...]: one per object
        x, y = gr.Number(label="x"), gr.Number(label="y")
        label = gr.Number(value=1, label="label", precision=0)
        question = gr.Textbox(label="question")
        tokens = gr.Number(value=h.default_max_new_tokens, label="max_new_tokens", precision=0)
        result = gr.JSON(label="result")
        triggers = {name: gr.Button(name) for name in ("segment", "click", "ground")}  # never shown or pressed
    endpoints = {
        "segment": (h.api_segment, [file, points, labels, boxes, objects]),
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
        "track_video": (v.api_track_video, [video, frame_index, points, labels, box, objects]),
    }
    for name, (fn, inputs) in video_endpoints.items():
        video_triggers[name].click(fn, inputs, [overlay, video_result], api_name=name,
                                   concurrency_id=MODEL_CONCURRENCY, concurrency_limit=1)


TabBuilder = Callable[[DemoContext], None]
TABS: list[tuple[str, TabBuilder]] = [("Image", image_tab), ("Video", video_tab)]


def build_app(grounder, *, examples_dir: Path | None = EXAMPLES_DIR, download_dir: Path | None = None,
              max_new_tokens: int = 256, tabs: Sequence[tuple[str, TabBuilder]] | None = None) -> gr.Blocks:
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
          max_new_tokens: int = 256, max_file_size: str | int = DEFAULT_MAX_FILE_SIZE,
          quantize: str | None = None) -> None:
    """Load the model and serve the app until interrupted."""
    from grounding import Grounder

    grounder = Grounder.from_pretrained(model, device=device, max_new_tokens=max_new_tokens, quantize=quantize)
    app = build_app(grounder, max_new_tokens=max_new_tokens)
    app.launch(**launch_options(host, port, max_file_size))
