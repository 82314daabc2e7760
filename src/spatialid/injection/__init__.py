"""Injection of identity tokens into diffusers' FLUX transformer (module hooks, no forward fork)."""

from spatialid.injection.injector import (
    IdentityInjector,
    InjectionRecord,
    InjectionSession,
    injection_points,
)

__all__ = ["IdentityInjector", "InjectionRecord", "InjectionSession", "injection_points"]
