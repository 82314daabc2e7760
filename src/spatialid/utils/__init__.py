"""Small helpers shared by the library and the command line (image loading, ...)."""

from spatialid.utils.images import MAX_IMAGE_PIXELS, load_image

__all__ = ["MAX_IMAGE_PIXELS", "load_image"]
