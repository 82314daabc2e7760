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

Cost and ``torch.compile``
--------------------------
Per injection point the spatial path adds only the mask (about 25 small kernels on ``[B, N]``
values, read from the CA's own raw output, so no second attention pass) to PuLID's work; the
residual update is one fused ``addcmul`` for both paths. Nothing in a step reads a tensor value
on the host (no ``.item()``, no Python branch on tensor data), except the optional mask
recording, which copies masks to the CPU by design. The hooks trace under
``torch.compile(transformer)`` (also with ``fullgraph=True``): dynamo guards on the session's
static settings (schedule fields, grid, whether identity tokens are given), so each distinct
schedule compiles once, while ``id_weight`` is passed as a 0-d tensor and the timestep as a
tensor and changing them does not recompile.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Union

import torch
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from spatialid.masks.schedule import SpatialSchedule

EmbedsSource = Union[torch.Tensor, Callable[[int], Union[torch.Tensor, None]]]

__all__ = ["IdentityInjector", "InjectionRecord", "InjectionSession", "injection_points"]


def injection_points(num_double: int, num_single: int, double_interval: int, single_interval: int) -> list[tuple[str, int]]:
    """The (stream, block index) pairs after which a CA module runs, in CA-module order."""
    if double_interval < 1 or single_interval < 1:
        raise ValueError(
            f"double_interval and single_interval must be >= 1, got {double_interval} and {single_interval}"
        )
    points = [("double", i) for i in range(num_double) if i % double_interval == 0]
    points += [("single", j) for j in range(num_single) if j % single_interval == 0]
    return points


@dataclass
class InjectionRecord:
    """One recorded mask: which transformer call, at what time t, at which injection point."""

    call_index: int
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
    calls: int = 0
    # id_weight != 0, and id_weight as a 0-d float32 tensor on the CA modules' device: the hooks
    # read these instead of the float so that torch.compile does not specialise on its value.
    _enabled: bool = True
    _weight: torch.Tensor | None = None
    # per-call state, set by the transformer pre-hook
    _embeds: torch.Tensor | None = None
    _t: torch.Tensor | None = None
    _t_float: float | None = None

    def masks_by_call(self) -> dict[int, list[InjectionRecord]]:
        """Records grouped by transformer call (one denoising step, or one CFG branch of it)."""
        grouped: dict[int, list[InjectionRecord]] = {}
        for rec in self.records:
            grouped.setdefault(rec.call_index, []).append(rec)
        return grouped


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
    ) -> Iterator[InjectionSession]:
        """Inject identity into every transformer call made inside the ``with`` block.

        Args:
            id_embeds: identity tokens ``[B or 1, n, kv_dim]`` (a batch of 1 is shared by all samples),
                or a callable ``fn(call_index) -> tokens | None`` asked once per transformer call
                (``call_index`` counts calls from 0); ``None`` leaves that call un-injected. The
                pipeline uses this for ``start_step`` and for true CFG's zero-identity branch.
            id_weight: scale of the identity residual; 0 disables injection (bit-identical output).
            schedule: a :class:`~spatialid.masks.SpatialSchedule`, or None for uniform PuLID injection.
            grid: ``(rows, cols)`` of the image-token grid, row-major (FLUX: ``(H // 16, W // 16)``).
                Needed with a schedule; inferred for square grids when omitted.
            record_masks: keep every mask (float16, CPU) in ``session.records`` for visualisation.
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
        )
        session._enabled = session.id_weight != 0.0
        device = next(self.ca_modules.parameters()).device
        # torch.full launches a fill kernel; torch.tensor would copy from the host (a sync on CUDA).
        session._weight = torch.full((), session.id_weight, dtype=torch.float32, device=device)
        self._session = session
        try:
            yield session
        finally:
            session._embeds = session._t = session._weight = None
            self._session = None

    def detach(self) -> None:
        """Remove every hook; the transformer is the plain model again."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._session = None

    def __repr__(self) -> str:
        return (
            f"IdentityInjector(points={len(self.points)}, double_interval={self.double_interval}, "
            f"single_interval={self.single_interval}, attached={self.attached})"
        )

    # ------------------------------------------------------------------ hooks
    def _on_transformer_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        session = self._session
        if session is None:
            return None
        call_index = session.calls
        session.calls += 1
        embeds = session.id_embeds(call_index) if callable(session.id_embeds) else session.id_embeds
        if embeds is None or not session._enabled:
            session._embeds = None
            return None
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if hidden is None:
            raise RuntimeError("IdentityInjector could not find hidden_states in the transformer call")
        if embeds.ndim != 3:
            raise ValueError(f"identity tokens must be [B, n_tokens, dim], got {tuple(embeds.shape)}")
        batch = hidden.shape[0]
        if embeds.shape[0] not in (1, batch):
            raise ValueError(
                f"identity tokens have batch {embeds.shape[0]} but the transformer batch is {batch}; "
                "give one embedding per sample or a single one for all"
            )
        param = next(self.ca_modules.parameters())
        if param.device != hidden.device:
            # Offloading moved the transformer; the CA modules follow it once.
            self.ca_modules.to(hidden.device)
            param = next(self.ca_modules.parameters())
        session._embeds = embeds.to(device=param.device, dtype=param.dtype).expand(batch, -1, -1)
        if session._weight.device != param.device:
            session._weight = session._weight.to(param.device)

        timestep = kwargs.get("timestep", args[3] if len(args) > 3 else None)
        session._t = None
        session._t_float = None
        if timestep is None:
            if session.schedule is not None:
                raise RuntimeError("a spatial schedule needs the transformer's `timestep` argument")
            return None
        t = torch.as_tensor(timestep, device=hidden.device).float().reshape(-1)
        session._t = t.expand(batch) if t.numel() == 1 else t
        if session.record_masks:
            session._t_float = float(session._t[0])  # host sync only when recording
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
            return text, self._inject(point, image, session)

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
                session.records.append(InjectionRecord(session.calls - 1, t, point, "uniform", ones))
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
            session.records.append(
                InjectionRecord(
                    session.calls - 1, t, point, phase, mask.detach()[..., 0].to("cpu", torch.float16)
                )
            )
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


def _attention_probs(ca: nn.Module, id_tokens: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """Softmax attention of each image token over the identity tokens, ``[B, heads, N, n_id]``.

    A float32 reference that recomputes the query/key projections of ``ca``. The injector itself
    takes the probabilities from the CA forward (``return_probs=True``), which costs no second
    projection; this helper remains for checks and analysis.
    """
    heads = ca.heads
    dim_head = ca.dim_head
    q = ca.to_q(ca.norm2(latents))
    k = ca.to_kv(ca.norm1(id_tokens))[..., : heads * dim_head]
    b, n, _ = q.shape
    q = q.view(b, n, heads, dim_head).transpose(1, 2).float()
    k = k.view(b, k.shape[1], heads, dim_head).transpose(1, 2).float()
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dim_head), dim=-1)
