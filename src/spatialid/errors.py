"""Exceptions raised by spatialid.

Every error meant for a user derives from :class:`SpatialIDError`; the CLI prints its message on
one line and exits with status 2, so messages must say what is wrong and what to do about it.
"""


class SpatialIDError(Exception):
    """Base class for errors caused by user input or the environment (not by bugs)."""


class CheckpointError(SpatialIDError, ValueError):
    """A weights file is missing, unreadable, or does not have the expected tensor layout."""


class FaceNotFoundError(SpatialIDError, ValueError):
    """No usable face was found in an identity photo."""


class ModelFilesMissingError(SpatialIDError, FileNotFoundError):
    """Model weights are needed but not present locally and cannot be downloaded (offline)."""


class InputImageError(SpatialIDError, ValueError):
    """An input image is missing, unreadable, not an image, animated, or too large."""
