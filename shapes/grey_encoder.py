"""A second SAM image encoder for grayscale images (the ``grey_encoder`` add-on, registered in shapes/addons.py).

On a grayscale image an object of about its ground's brightness differs from it by texture and a faint edge only.
SAM's image encoder, which reads colour well, then gives masks that follow the ground's texture (the phrasing
suite's grey scenes on blotchy grounds). An encoder trained on such views (``train-mask-encoder --camouflage``)
reads them much better but colour scenes a little worse (held-out testA cIoU 75.16 -> 74.88). Whether an image is
grayscale is known exactly from its pixels, so each encoder reads the images it is good at: the add-on holds the
grey encoder (weights ``addons.grey_encoder.encoder.*``) and routes every image whose three channels are equal, and
each crop of one (``mask_zoom``), to it. Colour images are read as before, bit for bit.
"""
from __future__ import annotations

import copy

from torch import nn

from segdecoder.refine import is_grey   # the same test gives a grey image no inside pass of mask_refine


def install(addon: nn.Module, backend) -> None:
    """Give ``addon`` (``addon.encoder``) a copy of ``backend``'s image encoder and make the backend read grayscale
    images with it."""
    if not hasattr(backend, "image_encoder_for"):
        raise ValueError(f"grey_encoder needs a SAM mask decoder (segdecoder/sam.py); this model's is "
                         f"{type(backend).__name__}")
    colour = backend.frozen_image_encoder_module()
    addon.encoder = copy.deepcopy(colour)
    backend.image_encoder_for = lambda image: addon.encoder if is_grey(image) else colour
