"""Which denoising step and which CFG branch a transformer call belongs to.

True CFG calls the transformer twice per step; the identity hooks must know which call is the
positive ("cond") branch and which the negative ("uncond") one. diffusers' FluxPipeline marks each
call with ``with transformer.cache_context("cond" | "uncond")``, so this module reads the branch
from there instead of trusting the call order:

* :func:`attach_context_probe` registers a tiny *stateful* diffusers ``ModelHook`` on the
  transformer whose only job is to receive that context. diffusers hands a cache context only to
  stateful hooks, by two routes the probe both accepts: recent releases (0.42) call
  ``_set_cache_context``, which sets a ``CacheContext`` on every ``StateManager`` attribute of a
  stateful hook; older ones (0.35) call ``HookRegistry._set_context(name)``, which calls
  ``hook._set_context(module, name)``. Its ``pre_forward``/``post_forward`` are the identity, so
  the forward computes exactly what it computed before.
* :class:`CallCounter` turns each call into a :class:`TransformerCall` record. With a context, a
  step is "each branch at most once": a branch seen again starts the next step, so uncond-before-cond
  or cond-only steps still get the right step (a ``step_index`` in the context, when a caller gives
  one, wins). Without a context (older diffusers, or a caller that does not use ``cache_context``)
  it falls back to counting: call ``i`` is step ``i // calls_per_step``, branch ``cond`` then
  ``uncond``.

Nothing here reads a tensor. The step bookkeeping runs when the context is entered (eagerly, in
the caller's loop), so under ``torch.compile`` the per-call hook frames guard only on the branch
name (one graph per branch) and on ints that become dynamic after their first change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

__all__ = [
    "COND",
    "UNCOND",
    "CONTEXT_PROBE_NAME",
    "CacheContextProbe",
    "CallCounter",
    "TransformerCall",
    "attach_context_probe",
    "detach_context_probe",
    "remove_hook_keeping_wrappers",
]

COND = "cond"
UNCOND = "uncond"
CONTEXT_PROBE_NAME = "spatialid_cache_context_probe"

try:  # diffusers >= 0.35 (the lower bound in pyproject); guarded so the fallback stays usable.
    from diffusers.hooks.hooks import HookRegistry, ModelHook, StateManager
except ImportError:  # pragma: no cover - only without diffusers' hook system
    HookRegistry = ModelHook = StateManager = None  # type: ignore[assignment,misc]


@dataclass(frozen=True)
class TransformerCall:
    """One transformer call inside an :meth:`IdentityInjector.active` block.

    Attributes:
        index: calls counted from 0 in this session, whatever their branch.
        step: 0-based denoising step of the call.
        branch: the cache-context name (``"cond"`` / ``"uncond"`` in FluxPipeline), or, without a
            context, ``"cond"`` then ``"uncond"`` by call order.
        from_context: True when ``branch`` (and ``step``) came from diffusers' cache context,
            False when they were inferred by counting calls.
    """

    index: int
    step: int
    branch: str
    from_context: bool = False


class CallCounter:
    """Assigns each transformer call its :class:`TransformerCall`.

    With a cache context, each branch runs at most once per step, so a branch seen again opens the
    next step. That is right for any order within a step and for single-branch steps, except a
    cond-only step directly followed by an uncond-first step, which reads as one step; a context
    ``step_index`` (when the caller passes one) removes that ambiguity.

    The step is worked out when the context is entered (:meth:`context_entered`, which the probe
    calls eagerly, outside any compiled graph), so the call itself only reads a ready
    ``(step, branch)``: under ``torch.compile`` the per-call frame guards on the branch name and
    one dynamic int, not on the counter's bookkeeping.

    Args:
        calls_per_step: calls per denoising step when no cache context is set (1 without true CFG,
            2 with it: cond first, then uncond), used only by the counting fallback.
    """

    def __init__(self, calls_per_step: int = 1) -> None:
        if calls_per_step not in (1, 2):
            raise ValueError(f"calls_per_step must be 1 or 2 (cond, then uncond), got {calls_per_step!r}")
        self.calls_per_step = calls_per_step
        self.calls = 0
        # context route: the current step and the branches it has run so far
        self._step = 0
        self._seen: tuple[str, ...] = ()
        # the (step, branch) of the context just entered, for the next call to take
        self.pending = False
        self._pending_step = 0
        self._pending_branch = COND

    def context_entered(self, branch: str | None, step_index: int | None = None) -> None:
        """A cache context named ``branch`` was entered (None: left); the next call belongs to it."""
        if branch is None:
            self.pending = False
            return
        self._pending_step = self._advance(branch, step_index)
        self._pending_branch = branch
        self.pending = True

    def next(self, branch: str | None = None, step_index: int | None = None) -> TransformerCall:
        """The record of the next call.

        Takes the context entered just before it when there is one (see :meth:`context_entered`);
        else ``branch`` / ``step_index`` are the current context's (a second call inside one context
        is the next step of that branch), or None for the counting fallback.
        """
        index = self.calls
        self.calls = index + 1
        if self.pending:
            self.pending = False
            return TransformerCall(index, self._pending_step, self._pending_branch, True)
        if branch is not None:
            return TransformerCall(index, self._advance(branch, step_index), branch, True)
        # // and - instead of divmod: dynamo does not trace divmod on a dynamic int.
        step = index // self.calls_per_step
        return TransformerCall(index, step, UNCOND if index - step * self.calls_per_step else COND, False)

    def _advance(self, branch: str, step_index: int | None) -> int:
        if step_index is not None:
            step = int(step_index)
            self._seen = (self._seen if step == self._step else ()) + (branch,)
            self._step = step
        elif branch in self._seen:  # each branch runs once per step: a repeat is the next step
            self._step = self._step + 1
            self._seen = (branch,)
        else:
            self._seen = self._seen + (branch,)
        return self._step


if ModelHook is not None:

    class _NoState:
        def reset(self, *args: Any, **kwargs: Any) -> None:
            return None

    class _ContextState(StateManager):  # type: ignore[misc,valid-type]
        """A ``StateManager`` (so diffusers hands it the context) that only remembers the context."""

        def __init__(self) -> None:
            super().__init__(_NoState)
            self.name: str | None = None
            self.step_index: int | None = None
            self.counters: list[CallCounter] = []

        def set_context(self, context: Any) -> None:
            # recent diffusers pass a CacheContext (or None); 0.35 passes the name (or None).
            if context is None or isinstance(context, str):
                self.name, self.step_index = context, None
            else:
                self.name = getattr(context, "name", None)
                self.step_index = getattr(context, "step_index", None)
            for counter in self.counters:
                counter.context_entered(self.name, self.step_index)

        def reset(self, *args: Any, **kwargs: Any) -> None:
            self.name = self.step_index = None
            self._state_cache = {}

    class CacheContextProbe(ModelHook):  # type: ignore[misc,valid-type]
        """Stateful diffusers hook that observes the transformer's cache context and nothing else.

        Shared by every user on one transformer (:func:`attach_context_probe` counts them), so an
        injector and a CFG helper do not each rewrap ``forward``.
        """

        _is_stateful = True

        def __init__(self) -> None:
            super().__init__()
            self.state = _ContextState()
            self.users = 0
            self.installed_forward: Any = None

        @property
        def name(self) -> str | None:
            """The current context name (``"cond"`` / ``"uncond"``), None outside ``cache_context``."""
            return self.state.name

        @property
        def step_index(self) -> int | None:
            """The context's ``step_index`` when the caller gave one (recent diffusers accept it)."""
            return self.state.step_index

        def subscribe(self, counter: CallCounter) -> None:
            """Tell ``counter`` about every context entered from now on (until :meth:`unsubscribe`)."""
            self.state.counters.append(counter)

        def unsubscribe(self, counter: CallCounter) -> None:
            """Stop telling ``counter`` (its session or warm-up ended)."""
            self.state.counters = [c for c in self.state.counters if c is not counter]

        def _set_context(self, module: nn.Module, name: str | None) -> nn.Module:
            # diffusers 0.35: HookRegistry._set_context(name) calls this on stateful hooks.
            self.state.set_context(name)
            return module

        def reset_state(self, module: nn.Module) -> nn.Module:
            self.state.reset()
            return module

else:  # pragma: no cover
    CacheContextProbe = None  # type: ignore[assignment,misc]


def attach_context_probe(module: nn.Module) -> Any:
    """Install (or share) the :class:`CacheContextProbe` on ``module``; None without diffusers hooks.

    Every call must be paired with :func:`detach_context_probe`; the hook is removed with the last user.
    """
    if CacheContextProbe is None:
        return None
    registry = HookRegistry.check_if_exists_or_initialize(module)
    probe = registry.get_hook(CONTEXT_PROBE_NAME)
    if probe is None:
        probe = CacheContextProbe()
        registry.register_hook(probe, CONTEXT_PROBE_NAME)
        probe.installed_forward = vars(module).get("forward")  # diffusers' pass-through wrapper
    probe.users += 1
    return probe


def detach_context_probe(module: nn.Module, probe: Any) -> None:
    """Release one use of ``probe``; the last release removes the hook (``forward`` as before)."""
    if probe is None:
        return
    probe.users -= 1
    if probe.users > 0:
        return
    registry = getattr(module, "_diffusers_hook", None)
    if registry is None or registry.get_hook(CONTEXT_PROBE_NAME) is not probe:
        return
    remove_hook_keeping_wrappers(module, CONTEXT_PROBE_NAME, getattr(probe, "installed_forward", None))


def remove_hook_keeping_wrappers(module: nn.Module, name: str, installed: Any) -> None:
    """Remove diffusers hook ``name`` from ``module`` without dropping wrappers added after it.

    ``installed`` is the ``forward`` the hook's registration put on the module. When something
    outside diffusers' registry wrapped ``forward`` afterwards (accelerate's offload hooks do, and
    call ``module._old_forward`` at run time), diffusers' removal would put back the pre-hook
    forward and drop that wrapper: keep the wrapper and unwrap the hook below it instead.
    """
    registry = getattr(module, "_diffusers_hook", None)
    if registry is None or registry.get_hook(name) is None:
        return
    current = vars(module).get("forward")
    order = getattr(registry, "_hook_order", None) or list(registry.hooks)
    outermost_hook = order[-1] == name
    registry.remove_hook(name, recurse=False)
    if outermost_hook and current is not installed:
        if installed is not None and getattr(module, "_old_forward", None) is installed:
            module._old_forward = getattr(module, "forward")
        if current is None:
            vars(module).pop("forward", None)
        else:
            module.forward = current
    # diffusers restores ``forward`` as an instance attribute holding the class's own bound
    # method; drop it then, so the module is exactly as before (same attributes, same guards).
    restored = vars(module).get("forward")
    if getattr(restored, "__func__", None) is type(module).forward and getattr(restored, "__self__", None) is module:
        del module.forward
