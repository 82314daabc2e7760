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

if TYPE_CHECKING:  # pragma: no cover
    from spatialid.masks.schedule import SpatialSchedule

EmbedsSource = Union[torch.Tensor, Callable[[TransformerCall], Union[torch.Tensor, None]]]

__all__ = [
    "EmbedsSource", "IdentityInjector", "InjectionRecord", "InjectionSession", "injection_points", "snap_to_schedule",
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
    mask: torch.Tensor  # float16 on CPU, [B, rows * cols]


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
    # id_weight != 0, and id_weight as a 0-d float32 tensor on the CA modules' device: the hooks
    # read these instead of the float so that torch.compile does not specialise on its value.
    _enabled: bool = True
    _weight: torch.Tensor | None = None
    # per-call state, set by begin_call
    _embeds: torch.Tensor | None = None
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
        if not callable(id_embeds) and not isinstance(id_embeds, torch.Tensor):
            raise TypeError("id_embeds must be a tensor [B, n, dim] or a callable returning one (or None)")
        if isinstance(id_embeds, torch.Tensor) and id_embeds.ndim != 3:
            raise ValueError(f"id_embeds must have shape [B, n_tokens, dim], got {tuple(id_embeds.shape)}")
        session = InjectionSession(
            id_embeds=id_embeds,
            id_weight=float(id_weight),
            schedule=schedule,
            grid=grid,
            record_masks=record_masks,
            sigmas=sigmas,
            _counter=CallCounter(calls_per_step),
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
            session._embeds = session._t = session._weight = None
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
        if embeds is None or not session._enabled:
            session._embeds = None
            return call
        if hidden_states is None:
            raise RuntimeError("IdentityInjector could not find hidden_states in the transformer call")
        if embeds.ndim != 3:
            raise ValueError(f"identity tokens must be [B, n_tokens, dim], got {tuple(embeds.shape)}")
        batch = hidden_states.shape[0]
        if embeds.shape[0] not in (1, batch):
            raise ValueError(
                f"identity tokens have batch {embeds.shape[0]} but the transformer batch is {batch}; "
                "give one embedding per sample or a single one for all"
            )
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
        return self._inject(point, image_tokens, session)

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
            if not (isinstance(output, tuple) and len(output) == 2):
                raise RuntimeError(
                    "FLUX blocks must return (encoder_hidden_states, hidden_states); this diffusers "
                    "version is not supported (need diffusers >= 0.35)"
                )
            text, image = output
            return text, self.inject(point, image)

        return hook

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
            mask_cpu = mask.detach()[..., 0].to("cpu", torch.float16)
            session.records.append(InjectionRecord(call.index, call.step, call.branch, t, point, phase, mask_cpu))
        # image + (w * M) * delta: the weight scales the small [B, N, 1] mask, then one fused pass.
        return torch.addcmul(image, mask.to(image.dtype) * weight, delta.to(image.dtype))

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
