"""Typed, user-facing errors. Each carries a one-line message a person can act on;
the CLI prints ``str(err)`` and exits non-zero, the web app shows it.

The base class and the errors the mask decoder raises live here, at the bottom of the import
graph (apps -> eval -> grounding -> segdecoder); ``grounding.errors`` re-exports them and adds
the rest, so each error is one class whichever module it is imported from."""
from __future__ import annotations


class GroundsegError(Exception):
    """Base of every error this project raises on purpose."""


class ImageError(GroundsegError):
    """An image could not be read or is outside what the service accepts."""


class PromptError(GroundsegError):
    """Clicks or boxes are malformed (wrong shape, outside the image, bad label)."""


class CheckpointError(GroundsegError):
    """A checkpoint is missing or does not match what was asked for; the message names the path."""


__all__ = ["GroundsegError", "ImageError", "PromptError", "CheckpointError"]
