"""Videos: the VLM answers on a key frame and its targets are carried through every frame (predict.py), the
results and how they are saved (results.py), frame-to-frame carrying with the image decoder (carry.py), video
files read and written as streams (io.py), and the J score on synthetic videos (evaluate.py)."""
from grounding.video.io import DEFAULT_MAX_VIDEO_PIXELS, VideoInfo, VideoReader, VideoWriter
from grounding.video.predict import MODES, predict_video, track, track_objects
from grounding.video.results import FrameObject, FrameResult, VideoRun

__all__ = ["DEFAULT_MAX_VIDEO_PIXELS", "FrameObject", "FrameResult", "MODES", "VideoInfo", "VideoReader", "VideoRun",
           "VideoWriter", "predict_video", "track", "track_objects"]
