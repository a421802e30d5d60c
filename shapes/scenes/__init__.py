"""The default model's synthetic data: scenes of coloured shapes with referring expressions, written in REFER's
format (synthetic.py), videos of moving shapes (synthetic_video.py), and per-patch labels (patch_labels.py)."""
