"""The app's image upload widget, changed so a big upload is not re-encoded on every event and a bad file gives
one readable line.

gradio_image_annotation's input decodes and re-encodes the whole upload with PIL on every event (each box drag
re-encoded a 12-megapixel photo, ~2 s) and let PIL's error, with the server's temporary path, reach the page when
the file was no image. :func:`image_input` passes the uploaded file's path on instead: the handler decodes it once
(``grounding.images.load_image``, whose errors name the file, not its folder) and answers a bad file with one line
and an empty input. (The change is made on the class, for this process: Gradio finds a component's browser code
by its class's module, so a subclass defined here would have none; and Gradio rebuilds a component from its class
for a session whose handler has updated it, so a change on one instance would not last.)
"""
from __future__ import annotations

from gradio_image_annotation import image_annotator


def _uploaded_path(self, image) -> str | None:
    """The value's ``"image"``: the path of the file as uploaded (in Gradio's upload folder), not decoded here."""
    return None if image is None else str(image.path)


def image_input(**kwargs) -> image_annotator:
    """An ``image_annotator`` (same arguments) whose value's ``"image"`` is the uploaded file's own path."""
    if image_annotator.preprocess_image is not _uploaded_path:
        image_annotator.preprocess_image = _uploaded_path
    return image_annotator(**kwargs)
