"""The package version, in one place (read by ``spatialid.__version__`` and by the build)."""

__version__ = "0.2.0"
