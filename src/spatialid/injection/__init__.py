"""Injection of identity tokens into diffusers' FLUX transformer (diffusers hooks, no forward fork)."""

from spatialid.injection.calls import COND, UNCOND, CallCounter, TransformerCall
from spatialid.injection.identity import IDENTITY_KEY, IdentityError, InjectionRecord, PuLIDIdentity, resolve_person
from spatialid.injection.injector import IdentityInjector, InjectionSession, injection_points, snap_to_schedule

__all__ = [
    "COND",
    "IDENTITY_KEY",
    "UNCOND",
    "CallCounter",
    "IdentityError",
    "IdentityInjector",
    "InjectionRecord",
    "InjectionSession",
    "PuLIDIdentity",
    "TransformerCall",
    "injection_points",
    "resolve_person",
    "snap_to_schedule",
]
