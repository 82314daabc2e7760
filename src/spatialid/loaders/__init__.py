"""Identity for any diffusers FLUX.1 pipeline (``load_pulid`` / ``unload_pulid``, identity passed per call).

Beside :mod:`spatialid.pipeline`: it may import injection, models, masks and pipeline; the app
layer and the front-ends import it. Names are exported lazily (torch and diffusers load on use).
"""

from spatialid._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "IDENTITY_KEY": "spatialid.loaders.pulid",
        "PuLIDIdentity": "spatialid.loaders.pulid",
        "PuLIDLoader": "spatialid.loaders.pulid",
        "load_pulid": "spatialid.loaders.pulid",
        "pulid_loader": "spatialid.loaders.pulid",
        "region_to_tokens": "spatialid.loaders.pulid",
        "unload_pulid": "spatialid.loaders.pulid",
        "with_identity": "spatialid.loaders.pulid",
    },
)
