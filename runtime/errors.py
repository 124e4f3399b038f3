"""Every error edgecap raises on purpose, in one place, so callers can catch by kind."""

from __future__ import annotations


class EdgecapError(Exception):
    """Base class of every error edgecap raises deliberately."""


class ModelError(EdgecapError):
    """A model directory is missing, corrupt, or inconsistent. Raised at load time."""


class ImageError(EdgecapError):
    """An input image could not be read or decoded. The message names the file and the reason."""

    def __init__(self, source: str, reason: str):
        self.source = source
        self.reason = reason
        super().__init__(f"{source}: {reason}")


class OptionsError(EdgecapError, ValueError):
    """Generation options that make no sense (e.g. num_beams < 1)."""
