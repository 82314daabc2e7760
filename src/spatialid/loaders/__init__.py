"""Identity for any diffusers FLUX.1 pipeline: ``load_pulid`` / ``unload_pulid`` / ``set_pulid_scale``,
the identity passed per call as ``joint_attention_kwargs["identity"]`` (a ``PuLIDIdentity``).

Between the injection layer and the pipeline (as diffusers' ``loaders`` sit below its pipelines):
it imports injection, models, masks, encoder and utils; ``SpatialIDPipeline`` is built on it.
``names`` holds the torch-free pipeline names and checks the CLI uses before anything loads.
Names are exported lazily (torch and diffusers load on use).
"""

from spatialid._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "IDENTITY_KEY": "spatialid.loaders.pulid",
        "PuLIDIdentity": "spatialid.loaders.pulid",
        "PuLIDLoader": "spatialid.loaders.pulid",
        "PuLIDLoaderMixin": "spatialid.loaders.pulid",
        "load_pulid": "spatialid.loaders.pulid",
        "pulid_loader": "spatialid.loaders.pulid",
        "set_pulid_scale": "spatialid.loaders.pulid",
        "unload_pulid": "spatialid.loaders.pulid",
        "with_identity": "spatialid.loaders.pulid",
    },
)
