"""Typed, user-facing errors. Each carries a one-line message a person can act on;
the CLI prints ``str(err)`` and exits non-zero, the web app shows it.

``GroundsegError``, ``ImageError``, ``PromptError`` and ``CheckpointError`` are defined in
``segdecoder.errors`` (the mask decoder raises them and must not import ``grounding``) and
re-exported here, so ``from grounding.errors import ...`` gives the very same classes."""
from __future__ import annotations

from segdecoder.errors import CheckpointError, GroundsegError, ImageError, PromptError


class QuestionError(GroundsegError):
    """A question is empty, too long for the model's context, or otherwise unusable."""


class DatasetError(GroundsegError):
    """A dataset folder or file is missing, malformed or unsafe; the message names the path."""


class VideoError(GroundsegError):
    """A video could not be read (no frames, truncated, corrupt, too large, bad timestamps) or written;
    the message names the file."""


__all__ = ["GroundsegError", "ImageError", "QuestionError", "PromptError", "CheckpointError",
           "DatasetError", "VideoError"]
