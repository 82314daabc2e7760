"""Injection of identity tokens into diffusers' FLUX transformer (module hooks, no forward fork)."""

from spatialid.injection.calls import COND, UNCOND, CallCounter, TransformerCall
from spatialid.injection.injector import (
    EmbedsSource,
    IdentityInjector,
    InjectionRecord,
    InjectionSession,
    injection_points,
    snap_to_schedule,
)

__all__ = [
    "COND",
    "UNCOND",
    "CallCounter",
    "EmbedsSource",
    "IdentityInjector",
    "InjectionRecord",
    "InjectionSession",
    "TransformerCall",
    "injection_points",
    "snap_to_schedule",
]
