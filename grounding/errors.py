"""Typed, user-facing errors. Each carries a one-line message a person can act on;
the CLI prints ``str(err)`` and exits non-zero, the web app shows it."""
from __future__ import annotations


class GroundsegError(Exception):
    """Base of every error this project raises on purpose."""


class ImageError(GroundsegError):
    """An image could not be read or is outside what the service accepts."""


class QuestionError(GroundsegError):
    """A question is empty, too long for the model's context, or otherwise unusable."""


class PromptError(GroundsegError):
    """Clicks or boxes are malformed (wrong shape, outside the image, bad label)."""


class CheckpointError(GroundsegError):
    """A checkpoint is missing or does not match what was asked for; the message names the path."""


class DatasetError(GroundsegError):
    """A dataset folder or file is missing, malformed or unsafe; the message names the path."""


class VideoError(GroundsegError):
    """A video could not be read (no frames, truncated, corrupt, too large, bad timestamps) or written;
    the message names the file."""
