"""Identity injection into a diffusers ``FluxTransformer2DModel`` through module hooks.

PuLID-FLUX places a cross-attention (CA) module after every ``double_interval``-th double-stream
block and then after every ``single_interval``-th single-stream block. Each CA reads the identity
tokens and the current image tokens ``h`` and adds its output back::

    PuLID (uniform):  h <- h + w * CA(Z_id, h)
    SpatialID:        h <- h + w * M_t * CA(Z_id, h)

where ``M_t`` is a per-token mask from :class:`spatialid.masks.SpatialSchedule`, computed at each
injection point from that CA module's own raw attention output (so no second attention pass).

Instead of forking diffusers' forward, the injector registers forward hooks on the blocks (which in
diffusers >= 0.35 return ``(encoder_hidden_states, hidden_states)`` with the image tokens separate)
and a forward pre-hook on the transformer that reads the call's ``timestep`` (FluxPipeline passes the
flow-matching sigma in [0, 1]). Outside :meth:`IdentityInjector.active` every hook returns ``None``,
so the transformer computes exactly what the plain model computes.

Each call is described by a :class:`~spatialid.injection.calls.TransformerCall` (index, denoising
step, CFG branch). The branch comes from diffusers' ``transformer.cache_context("cond" | "uncond")``,
observed by a stateful diffusers hook that passes the forward through unchanged; only when no
context is set does the injector fall back to counting calls (see :mod:`spatialid.injection.calls`). The two
hooks are thin wrappers around the public per-call API, :meth:`IdentityInjector.begin_call` and
:meth:`IdentityInjector.inject`, which tools (the step-cost benchmark) drive directly.

Several people
--------------
``id_embeds`` may hold one token tensor per person. Each injection point then runs the CA for
all K identities in one call (:meth:`PerceiverAttentionCA.forward_people`: the image tokens are
projected to queries once) and adds ``w * sum_k M_k * CA(Z_k, h)``, with per-person masks that
compete so that ``sum_k M_k <= 1`` (:mod:`spatialid.masks.multi`). ``regions`` bound each
person's mask (also for one person), ``mask_source`` replays recorded masks. One identity with no
region and no mask source keeps the single-identity code path, bit for bit.

Cost and ``torch.compile``
--------------------------
Per injection point the spatial path adds only the mask (about 25 small kernels on ``[B, N]``
values, read from the CA's own raw output, so no second attention pass) to PuLID's work; the
residual update is one fused ``addcmul`` for both paths. Nothing in a step reads a tensor value
on the host (no ``.item()``, no Python branch on tensor data), except the optional mask
recording, which copies masks to the CPU by design. The hooks trace under
``torch.compile(transformer)`` (also with ``fullgraph=True``): dynamo guards on the session's
static settings (schedule fields, grid, whether identity tokens are given, the call's branch), so
each distinct schedule compiles once (and once per CFG branch), while ``id_weight`` is passed as a
0-d tensor and the timestep as a tensor and changing them does not recompile.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Union

import torch
from torch import nn

from spatialid.injection.calls import (
    CallCounter,
    TransformerCall,
    attach_context_probe,
    detach_context_probe,
)
from spatialid.masks import multi

if TYPE_CHECKING:  # pragma: no cover
    from spatialid.masks.schedule import SpatialSchedule

#: Identity tokens: one person's ``[B|1, n, dim]``, a list of them (one per person), or a callable
#: returning either (or None) per transformer call.
PeopleTokens = Union[torch.Tensor, Sequence[torch.Tensor]]  # noqa: UP007 (a runtime alias)
EmbedsSource = Union[PeopleTokens, Callable[[TransformerCall], Union[PeopleTokens, None]]]  # noqa: UP007
#: Recorded masks to use instead of computing them: ``fn(call, point) -> [K, B, N] | None``.
MaskSource = Callable[[TransformerCall, int], Union[torch.Tensor, None]]  # noqa: UP007

__all__ = [
    "EmbedsSource", "IdentityInjector", "InjectionRecord", "InjectionSession", "MaskSource", "PeopleTokens",
    "injection_points", "snap_to_schedule",
]


def injection_points(num_double: int, num_single: int, double_interval: int, single_interval: int) -> list[tuple[str, int]]:
    """The (stream, block index) pairs after which a CA module runs, in CA-module order."""
    if double_interval < 1 or single_interval < 1:
        raise ValueError(
            f"double_interval and single_interval must be >= 1, got {double_interval} and {single_interval}"
        )
    points = [("double", i) for i in range(num_double) if i % double_interval == 0]
    points += [("single", j) for j in range(num_single) if j % single_interval == 0]
    return points


def snap_to_schedule(t: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Replace each time in ``t`` by the nearest of the sampler's exact times ``sigmas``.

    FluxPipeline hands the transformer ``timestep`` cast to the latents' dtype; in bfloat16 that
    moves a time by up to ~0.002 (8 mantissa bits at t*1000 ~ 700), enough to cross a phase
    boundary, while neighbouring times of a schedule are >= ~0.005 apart up to ~100 steps. Tensor
    ops only (no host sync, no data-dependent branch), so it traces under ``torch.compile``.
    """
    table = sigmas.to(device=t.device, dtype=torch.float32).reshape(-1)
    index = (table[None, :] - t.float()[:, None]).abs().argmin(dim=1)
    return table[index]


@dataclass
class InjectionRecord:
    """One recorded mask: which transformer call (index, step, branch), at what t, at which point.

    Step and branch are the call's :class:`TransformerCall` fields, so consumers group masks by
    step and keep the positive branch without re-deriving them from the call order.
    """

    call_index: int
    step: int
    branch: str
    t: float
    point: int
    phase: str
    # on CPU in the session's record_dtype (float16 by default): [B, rows * cols] for one identity
    # without region; [K, B, rows * cols] (one mask per person) on the multi-identity path
    mask: torch.Tensor


@dataclass
class InjectionSession:
    """State of one :meth:`IdentityInjector.active` block (what the hooks read)."""

    id_embeds: EmbedsSource
    id_weight: float
    schedule: SpatialSchedule | None
    grid: tuple[int, int] | None
    record_masks: bool
    records: list[InjectionRecord] = field(default_factory=list)
    # the sampler's exact (float) times, or a callable returning them; see snap_to_schedule
    sigmas: torch.Tensor | Callable[[], torch.Tensor | None] | None = None
    # the current call (set by begin_call) and the counter that numbers calls into steps/branches
    call: TransformerCall | None = None
    _counter: CallCounter = field(default_factory=CallCounter)
    # image tokens being generated: the first ``generated_tokens`` of the image stream get identity
    # (FLUX.1 Kontext appends its context image's tokens after them); None = all of them
    generated_tokens: int | None = None
    # Several people / regions (see spatialid.masks.multi): upper bounds [K, rows, cols] in [0, 1]
    # (also for one person), recorded masks to replay, and the dtype recorded masks are kept in.
    regions: torch.Tensor | None = None
    mask_source: MaskSource | None = None
    record_dtype: torch.dtype = torch.float16
    # id_weight != 0, and id_weight as a 0-d float32 tensor on the CA modules' device: the hooks
    # read these instead of the float so that torch.compile does not specialise on its value.
    _enabled: bool = True
    _weight: torch.Tensor | None = None
    # per-call state, set by begin_call
    _embeds: torch.Tensor | None = None
    _people: torch.Tensor | None = None  # [K, B, n, dim] on the multi-identity path, else None
    _layouts: dict[Any, Any] = field(default_factory=dict)  # (K, rows, cols, device) -> masks.multi.Layout
    _t: torch.Tensor | None = None
    _t_float: float | None = None

    @property
    def calls(self) -> int:
        """Transformer calls begun in this session so far."""
        return self._counter.calls


class IdentityInjector:
    """Attach PuLID-FLUX CA modules to a diffusers FLUX transformer with optional spatial masks.

    Args:
        transformer: a ``diffusers.FluxTransformer2DModel`` (or anything with ``transformer_blocks``
            and ``single_transformer_blocks`` whose blocks return ``(text, image)`` tuples).
        ca_modules: the CA modules in checkpoint order (``pulid_ca.0`` ...), one per injection point.
        double_interval: a CA runs after double block ``i`` when ``i % double_interval == 0``.
        single_interval: then after single block ``j`` when ``j % single_interval == 0``.

    The hooks stay installed until :meth:`detach`; they only act inside :meth:`active`.
    """

    def __init__(
        self,
        transformer: nn.Module,
        ca_modules: Sequence[nn.Module],
        double_interval: int = 2,
        single_interval: int = 4,
    ) -> None:
        double_blocks = getattr(transformer, "transformer_blocks", None)
        single_blocks = getattr(transformer, "single_transformer_blocks", None)
        if double_blocks is None or single_blocks is None:
            raise TypeError(
                "IdentityInjector needs a FLUX transformer with `transformer_blocks` and "
                f"`single_transformer_blocks`; got {type(transformer).__name__}"
            )
        points = injection_points(len(double_blocks), len(single_blocks), double_interval, single_interval)
        if len(points) != len(ca_modules):
            raise ValueError(
                f"{len(ca_modules)} CA modules given but the transformer has {len(points)} injection points "
                f"({len(double_blocks)} double blocks every {double_interval}, {len(single_blocks)} single "
                f"blocks every {single_interval}); use a PuLID checkpoint made for this transformer"
            )
        self.transformer = transformer
        self.ca_modules = ca_modules if isinstance(ca_modules, nn.ModuleList) else nn.ModuleList(ca_modules)
        self.double_interval = double_interval
        self.single_interval = single_interval
        self.points = points
        self._session: InjectionSession | None = None
        self._handles: list[Any] = []
        # Set by a step cache (spatialid.injection.step_cache): True when a point's residual is
        # already part of the block output (a cached step reuses the last computed residual).
        self.skip_point: Callable[[int], bool] | None = None
        # Observes diffusers' cache context ("cond"/"uncond"); None without diffusers' hook system.
        self._probe: Any = attach_context_probe(transformer)
        self._handles.append(transformer.register_forward_pre_hook(self._on_transformer_call, with_kwargs=True))
        for index, (stream, block_index) in enumerate(points):
            block = double_blocks[block_index] if stream == "double" else single_blocks[block_index]
            self._handles.append(block.register_forward_hook(self._make_block_hook(index)))

    # ------------------------------------------------------------------ public API
    @property
    def attached(self) -> bool:
        return bool(self._handles)

    @property
    def session(self) -> InjectionSession | None:
        """The active session, or None outside :meth:`active`."""
        return self._session

    @contextlib.contextmanager
    def active(
        self,
        id_embeds: EmbedsSource,
        id_weight: float = 1.0,
        schedule: SpatialSchedule | None = None,
        grid: tuple[int, int] | None = None,
        record_masks: bool = False,
        calls_per_step: int = 1,
        sigmas: torch.Tensor | Callable[[], torch.Tensor | None] | None = None,
        generated_tokens: int | None = None,
        regions: torch.Tensor | None = None,
        mask_source: MaskSource | None = None,
        record_dtype: torch.dtype = torch.float16,
    ) -> Iterator[InjectionSession]:
        """Inject identity into every transformer call made inside the ``with`` block.

        Args:
            id_embeds: identity tokens ``[B or 1, n, kv_dim]`` (a batch of 1 is shared by all samples),
                or a callable ``fn(call: TransformerCall) -> tokens | None`` asked once per
                transformer call with that call's ``index``, ``step`` and ``branch`` (``"cond"`` /
                ``"uncond"``); ``None`` leaves that call un-injected. The pipeline uses this for
                ``start_step`` and for true CFG's zero-identity branch.
            id_weight: scale of the identity residual; 0 disables injection (bit-identical output).
            schedule: a :class:`~spatialid.masks.SpatialSchedule`, or None for uniform PuLID injection.
            grid: ``(rows, cols)`` of the image-token grid, row-major (FLUX: ``(H // 16, W // 16)``).
                Needed with a schedule; inferred for square grids when omitted.
            record_masks: keep every mask (float16, CPU) in ``session.records`` for visualisation.
            calls_per_step: transformer calls per denoising step (2 with true CFG: cond, then
                uncond). Used only when a call carries no diffusers cache context, to number calls
                into steps and branches by order.
            sigmas: the sampler's float times (e.g. ``scheduler.sigmas``), or a callable returning
                them when asked (the pipeline's scheduler sets them only once the call has begun).
                The schedule's phase is then decided from the exact time: the transformer's
                ``timestep`` argument is rounded to the latents' dtype (bfloat16 moves 0.7009 to
                0.6992, into another phase), so it is snapped to the nearest of these times
                (:func:`snap_to_schedule`).
            generated_tokens: only the first this many image tokens receive identity (and form
                ``grid``); the rest pass unchanged (FLUX.1 Kontext's context-image tokens). None = all.
            regions: upper bounds of each person's mask, ``[K, rows, cols]`` in [0, 1] on the
                token grid (``spatialid.masks.multi.box_region`` / ``region_from_mask``), in the
                order of the people; also for one identity (e.g. an inpainting mask). Outside its
                region a person's residual is exactly zero; a region is also the early prior.
            mask_source: ``fn(call, point) -> [K, B, N] masks | None``: use these (recorded)
                masks for that call and point instead of computing them.
            record_dtype: dtype of recorded masks (float32 to replay them bit for bit).

        ``id_embeds`` may also be a list of tensors (or a callable returning one), one per person.
        With one identity, no region and no ``mask_source`` the single-identity code path runs
        (bit-identical to before); several identities, regions or a mask source select the
        multi-identity path (:mod:`spatialid.masks.multi`).
        """
        if not self.attached:
            raise RuntimeError("this IdentityInjector was detached; create a new one")
        if self._session is not None:
            raise RuntimeError("IdentityInjector.active() blocks cannot be nested")
        if not isinstance(id_weight, (int, float)) or isinstance(id_weight, bool) or not math.isfinite(id_weight):
            raise ValueError(f"id_weight must be a finite number, got {id_weight!r}")
        if grid is not None:
            rows, cols = (int(v) for v in grid)
            if rows < 1 or cols < 1:
                raise ValueError(f"grid must be two positive integers (rows, cols), got {grid!r}")
            grid = (rows, cols)
        if isinstance(id_embeds, (list, tuple)):
            if not id_embeds or not all(isinstance(e, torch.Tensor) and e.ndim == 3 for e in id_embeds):
                raise ValueError("id_embeds as a list needs one tensor [B, n_tokens, dim] per person")
        elif not callable(id_embeds) and not isinstance(id_embeds, torch.Tensor):
            raise TypeError("id_embeds must be a tensor [B, n, dim], a list of them, or a callable returning one (or None)")
        if isinstance(id_embeds, torch.Tensor) and id_embeds.ndim != 3:
            raise ValueError(f"id_embeds must have shape [B, n_tokens, dim], got {tuple(id_embeds.shape)}")
        if regions is not None:
            if not isinstance(regions, torch.Tensor) or regions.ndim != 3:
                raise ValueError("regions must be a tensor [persons, rows, cols] of upper bounds in [0, 1]")
            if grid is not None and tuple(regions.shape[1:]) != grid:
                raise ValueError(f"regions are on a {tuple(regions.shape[1:])} grid but grid is {grid}")
        session = InjectionSession(
            id_embeds=id_embeds,
            id_weight=float(id_weight),
            schedule=schedule,
            grid=grid,
            record_masks=record_masks,
            sigmas=sigmas,
            _counter=CallCounter(calls_per_step),
            generated_tokens=None if generated_tokens is None else int(generated_tokens),
            regions=regions,
            mask_source=mask_source,
            record_dtype=record_dtype,
        )
        session._enabled = session.id_weight != 0.0
        device = next(self.ca_modules.parameters()).device
        # torch.full launches a fill kernel; torch.tensor would copy from the host (a sync on CUDA).
        session._weight = torch.full((), session.id_weight, dtype=torch.float32, device=device)
        self._session = session
        if self._probe is not None:
            self._probe.subscribe(session._counter)
        try:
            yield session
        finally:
            if self._probe is not None:
                self._probe.unsubscribe(session._counter)
            session._embeds = session._t = session._weight = session._people = None
            session._layouts.clear()
            self._session = None

    def begin_call(self, hidden_states: torch.Tensor | None, timestep: Any = None) -> TransformerCall:
        """Start one transformer call of the active session and return its record.

        Numbers the call (step and branch from diffusers' cache context when one is set, else by
        order), asks ``id_embeds`` for its tokens and prepares what :meth:`inject` reads: the
        tokens expanded to the batch of ``hidden_states`` and the per-sample time ``timestep``
        (the sigma FluxPipeline passes). The transformer pre-hook calls this with the call's own
        arguments; call it directly to drive injection points without running the transformer.

        Raises:
            RuntimeError: outside :meth:`active`, when this call is injected and
                ``hidden_states`` is None (or ``timestep`` is None with a schedule), or when the CA
                modules are not on the device of ``hidden_states``.
        """
        session = self._session
        if session is None:
            raise RuntimeError("IdentityInjector.begin_call() needs an active() block")
        counter = session._counter
        probe = self._probe
        if counter.pending or probe is None:  # the context just entered (already numbered), or by order
            call = counter.next()
        else:
            call = counter.next(probe.name, probe.step_index)
        session.call = call
        embeds = session.id_embeds(call) if callable(session.id_embeds) else session.id_embeds
        session._people = None
        if embeds is None or not session._enabled:
            session._embeds = None
            return call
        if hidden_states is None:
            raise RuntimeError("IdentityInjector could not find hidden_states in the transformer call")
        people = list(embeds) if isinstance(embeds, (list, tuple)) else [embeds]
        batch = hidden_states.shape[0]
        for person in people:
            if person.ndim != 3:
                raise ValueError(f"identity tokens must be [B, n_tokens, dim], got {tuple(person.shape)}")
            if person.shape[0] not in (1, batch):
                raise ValueError(
                    f"identity tokens have batch {person.shape[0]} but the transformer batch is {batch}; "
                    "give one embedding per sample or a single one for all"
                )
        if len(people) > 1 and any(p.shape[1:] != people[0].shape[1:] for p in people):
            raise ValueError("every person's identity tokens must have the same [n_tokens, dim]")
        if session.regions is not None and session.regions.shape[0] != len(people):
            raise ValueError(f"{session.regions.shape[0]} regions for {len(people)} identities; give one region per person")
        embeds = people[0]
        param = next(self.ca_modules.parameters())
        if param.device != hidden_states.device:
            # No moving here: the CA modules are placed by whoever owns them (SpatialIDPipeline
            # registers them as its `pulid` component, which .to() and offloading place).
            raise RuntimeError(
                f"the CA modules are on {param.device} but the transformer runs on {hidden_states.device}; "
                f"put them there: pipe.to({str(hidden_states.device)!r}) (enable_*_cpu_offload() places them "
                f"itself), or injector.ca_modules.to({str(hidden_states.device)!r}) when driving IdentityInjector directly"
            )
        session._embeds = embeds.to(device=param.device, dtype=param.dtype).expand(batch, -1, -1)
        if len(people) > 1 or session.regions is not None or session.mask_source is not None:
            session._people = torch.stack(
                [p.to(device=param.device, dtype=param.dtype).expand(batch, -1, -1) for p in people]
            )
        if session._weight.device != param.device:
            session._weight = session._weight.to(param.device)

        session._t = None
        session._t_float = None
        if timestep is None:
            if session.schedule is not None:
                raise RuntimeError("a spatial schedule needs the transformer's `timestep` argument")
            return call
        t = torch.as_tensor(timestep, device=hidden_states.device).float().reshape(-1)
        if session.schedule is not None and session.sigmas is not None:
            table = session.sigmas() if callable(session.sigmas) else session.sigmas
            if table is not None:
                t = snap_to_schedule(t, table)
        session._t = t.expand(batch) if t.numel() == 1 else t
        if session.record_masks:
            session._t_float = float(session._t[0])  # host sync only when recording
        return call

    def inject(self, point: int, image_tokens: torch.Tensor) -> torch.Tensor:
        """Add the identity residual of injection point ``point`` to the current call's image tokens.

        ``point`` indexes :attr:`points` / :attr:`ca_modules`; ``image_tokens`` is ``[B, N, dim]``,
        the image stream after that point's block. Returns ``h + w * M_t * CA(Z_id, h)`` (``M_t = 1``
        without a schedule), or ``image_tokens`` itself when the current call is not injected. The
        block hooks call this; with :meth:`begin_call` it times or checks one point in isolation.

        Raises:
            RuntimeError: outside :meth:`active`.
        """
        session = self._session
        if session is None:
            raise RuntimeError("IdentityInjector.inject() needs an active() block and begin_call()")
        if session._embeds is None:
            return image_tokens
        n = session.generated_tokens
        if n is not None and image_tokens.shape[1] > n:  # context tokens after the generated ones stay as they are
            return torch.cat([self._inject_any(point, image_tokens[:, :n], session), image_tokens[:, n:]], dim=1)
        return self._inject_any(point, image_tokens, session)

    def detach(self) -> None:
        """Remove every hook (the context probe too); the transformer is the plain model again."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._probe is not None:
            detach_context_probe(self.transformer, self._probe)
            self._probe = None
        self._session = None

    def __repr__(self) -> str:
        return (
            f"IdentityInjector(points={len(self.points)}, double_interval={self.double_interval}, "
            f"single_interval={self.single_interval}, attached={self.attached})"
        )

    # ------------------------------------------------------------------ hooks
    def _on_transformer_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._session is None:
            return None
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        timestep = kwargs.get("timestep", args[3] if len(args) > 3 else None)
        self.begin_call(hidden, timestep)
        return None

    def _make_block_hook(self, point: int) -> Callable:
        def hook(module: nn.Module, inputs: Any, output: Any) -> Any:
            session = self._session
            if session is None or session._embeds is None:
                return None
            if self.skip_point is not None and self.skip_point(point):  # already in a step cache's output
                return None
            if not (isinstance(output, tuple) and len(output) == 2):
                raise RuntimeError(
                    "FLUX blocks must return (encoder_hidden_states, hidden_states); this diffusers "
                    "version is not supported (need diffusers >= 0.35)"
                )
            text, image = output
            return text, self.inject(point, image)

        return hook

    def _inject_any(self, point: int, image: torch.Tensor, session: InjectionSession) -> torch.Tensor:
        if session._people is not None:
            return self._inject_people(point, image, session)
        return self._inject(point, image, session)

    def _inject(self, point: int, image: torch.Tensor, session: InjectionSession) -> torch.Tensor:
        ca = self.ca_modules[point]
        embeds = session._embeds
        latents = image.to(embeds.dtype)
        schedule = session.schedule
        weight = session._weight
        if schedule is None:
            delta = ca(embeds, latents)
            if session.record_masks:
                t = session._t_float if session._t_float is not None else float("nan")
                ones = torch.ones(image.shape[0], image.shape[1], dtype=torch.float16)
                call = session.call
                session.records.append(InjectionRecord(call.index, call.step, call.branch, t, point, "uniform", ones))
            # image + w * delta in one pass (the 0-d weight does not change the result dtype).
            return torch.addcmul(image, weight, delta.to(image.dtype))

        rows, cols = self._grid(session, image.shape[1])
        attn_probs = None
        if schedule.needs_attention_probs:
            # One pass gives the output, the raw output and the probabilities (no second
            # projection of the image tokens).
            delta, raw, attn_probs = ca(embeds, latents, return_probs=True)
        else:
            delta, raw = ca(embeds, latents, return_raw=True)
        mask = schedule.mask(session._t, raw, rows, cols, attn_probs=attn_probs)
        if session.record_masks:
            t = session._t_float if session._t_float is not None else float("nan")
            phase = schedule.phase(t) if math.isfinite(t) else "unknown"
            call = session.call
            mask_cpu = mask.detach()[..., 0].to("cpu", session.record_dtype)
            session.records.append(InjectionRecord(call.index, call.step, call.branch, t, point, phase, mask_cpu))
        # image + (w * M) * delta: the weight scales the small [B, N, 1] mask, then one fused pass.
        return torch.addcmul(image, mask.to(image.dtype) * weight, delta.to(image.dtype))

    def _inject_people(self, point: int, image: torch.Tensor, session: InjectionSession) -> torch.Tensor:
        """``h + w * sum_k M_k * CA(Z_k, h)`` with competing per-person masks (:mod:`spatialid.masks.multi`)."""
        ca = self.ca_modules[point]
        people = session._people  # [K, B, n, dim]
        count = people.shape[0]
        latents = image.to(people.dtype)
        schedule = session.schedule
        rows, cols = self._grid(session, image.shape[1])
        want_probs = schedule is not None and schedule.needs_attention_probs
        probs = None
        if count == 1:
            # the very call the single-identity path makes, so a replay gets the same residual bits
            if want_probs:
                delta, raw, probs = ca(people[0], latents, return_probs=True)
                probs = probs.unsqueeze(0)
            else:
                delta, raw = ca(people[0], latents, return_raw=True)
            deltas, raws = delta.unsqueeze(0), raw.unsqueeze(0)
        elif want_probs:
            deltas, raws, probs = ca.forward_people(people, latents, return_probs=True)
        else:
            deltas, raws = ca.forward_people(people, latents)
        call = session.call
        masks = session.mask_source(call, point) if session.mask_source is not None and call is not None else None
        if masks is not None:
            masks = masks.to(device=image.device, dtype=torch.float32)
        elif count == 1 and session.regions is None:
            # one person, no region (a replay's negative branch): the single-identity schedule mask
            if schedule is None:
                masks = torch.ones(1, image.shape[0], image.shape[1], device=image.device, dtype=raws.dtype)
            else:
                single = schedule.mask(session._t, raws[0], rows, cols, attn_probs=None if probs is None else probs[0])
                masks = single[..., 0].unsqueeze(0)
        else:
            key = (count, rows, cols, image.device)
            people_layout = session._layouts.get(key)
            if people_layout is None:  # host work once per session and grid, not per step
                sigma = schedule.center_sigma if schedule is not None else 0.3
                people_layout = multi.layout(count, rows, cols, sigma, session.regions, image.device)
                session._layouts[key] = people_layout
            masks = multi.multi_masks(schedule, session._t, raws, rows, cols, people_layout, attn_probs=probs)
            masks = masks.to(raws.dtype)  # the precision the single-identity masks have
        if session.record_masks:
            t = session._t_float if session._t_float is not None else float("nan")
            phase = "uniform" if schedule is None else (schedule.phase(t) if math.isfinite(t) else "unknown")
            mask_cpu = masks.detach().to("cpu", session.record_dtype)
            session.records.append(InjectionRecord(call.index, call.step, call.branch, t, point, phase, mask_cpu))
        weighted = masks.to(image.dtype).unsqueeze(-1) * session._weight  # [K, B, N, 1]
        out = image
        for k in range(count):  # K is static: unrolled under torch.compile
            out = torch.addcmul(out, weighted[k], deltas[k].to(image.dtype))
        return out

    @staticmethod
    def _grid(session: InjectionSession, num_tokens: int) -> tuple[int, int]:
        if session.grid is not None:
            rows, cols = session.grid
            if rows * cols != num_tokens:
                raise ValueError(
                    f"grid {rows}x{cols} = {rows * cols} tokens but the transformer has {num_tokens} image "
                    "tokens; pass grid=(height // 16, width // 16)"
                )
            return rows, cols
        side = math.isqrt(num_tokens)
        if side * side != num_tokens:
            raise ValueError(f"{num_tokens} image tokens do not form a square grid; pass grid=(rows, cols)")
        return side, side
