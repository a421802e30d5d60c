"""The mask side of groundseg: one interface (``MaskDecoderBackend``), two backends (SAM, SAM2).

``build_decoder("sam", "vit_h", checkpoint="sam_vit_h_4b8939.pth")`` or
``build_decoder("sam2", "hiera_l", checkpoint="sam2.1_hiera_large.pt")``; the backend modules
(and their ``segment_anything`` / ``sam2`` imports) load only when a backend is built.
"""
from .base import ImageEmbedding, MaskDecoderBackend, MaskPrediction
from .build import PRESETS, build_decoder

__all__ = ["ImageEmbedding", "MaskDecoderBackend", "MaskPrediction", "PRESETS", "build_decoder"]
