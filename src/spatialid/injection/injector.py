"""Identity injection into a diffusers FLUX transformer through diffusers' hook registry.

PuLID-FLUX places a cross-attention (CA) module after every ``double_interval``-th double-stream
block and then after every ``single_interval``-th single-stream block. Each CA reads the identity
tokens and the current image tokens ``h`` and adds its output back::

    PuLID (uniform):  h <- h + w * CA(Z_id, h)
    SpatialID:        h <- h + w * sum_k M_k * CA(Z_k, h)

One person is the case K = 1 of several people: one code path, one mask function
(:func:`spatialid.masks.compute.identity_masks`), read from each CA module's own raw output.

Hooks
-----
The injector registers diffusers ``ModelHook`` s (``HookRegistry``), not torch hooks:

* on the transformer, :class:`_CallHook`: takes the call's identity out of
  ``joint_attention_kwargs["identity"]`` (so attention processors get exactly a plain call's
  arguments), numbers the call (step and CFG branch, :mod:`spatialid.injection.calls`) and
  prepares what the block hooks read; its ``post_forward`` does true CFG's warm-up (before
  ``cfg_start_step`` the negative branch returns the positive output);
* on each block with a CA module, :class:`_PointHook`: ``h + w * sum_k M_k * CA(Z_k, h)`` on the
  block's image tokens. It is registered innermost on its block (before any step cache's hook),
  so when diffusers' First Block Cache skips a block, the identity of that block is skipped with
  it: the cached residual of the last full step already holds it. The same holds for a cache
  enabled with diffusers' own ``transformer.enable_cache(...)``. When what the injection does
  changes between steps (identity switched on at ``start_step``, a new schedule phase), the
  cache's state is reset through its hook's ``reset_state`` (diffusers' own reset) so that step is
  computed in full.

Outside a call that carries an identity (or an :meth:`IdentityInjector.active` block) every hook
passes through: the transformer computes exactly what the plain model computes.

Compiled
--------
Nothing in a step reads a tensor value on the host or branches on tensor data: the phase is a
``torch.where`` on the snapped time, masks are recorded into preallocated tensors indexed by the
step, replayed masks are read from a tensor table, ``id_weight`` is a 0-d tensor. So the hooks
trace under ``torch.compile(transformer, fullgraph=True)``; the graph depends on the identity's
structure (people, schedule, grid), not on its values. The image-token grid comes from the
identity's ``height``/``width`` (the pipelines of this project always give them) or, eagerly,
from the call's ``img_ids``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from spatialid.injection.calls import (
    CallCounter,
    TransformerCall,
    attach_context_probe,
    detach_context_probe,
    remove_hook_keeping_wrappers,
)
from spatialid.injection.hooks import (
    CALL_HOOK,
    POINT_HOOK,
    WORDS_HOOK,
    CallHook,
    PointHook,
    WordsHook,
    register_innermost,
)
from spatialid.injection.identity import IdentityError, PuLIDIdentity, as_identity
from spatialid.masks.compute import build_layout, identity_masks, phase_index, time_column
from spatialid.masks.fused import fused_identity_masks, use_fused

try:
    from diffusers.hooks.hooks import HookRegistry
except ImportError:  # pragma: no cover - diffusers >= 0.35 is a dependency
    HookRegistry = None  # type: ignore[assignment,misc]

__all__ = ["IdentityInjector", "InjectionSession", "injection_points", "snap_to_schedule"]



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
    moves a time by up to ~0.002, enough to cross a phase boundary, while neighbouring times of a
    schedule are >= ~0.005 apart up to ~100 steps. Tensor ops only (no host sync).
    """
    table = sigmas.to(device=t.device, dtype=torch.float32).reshape(-1)
    index = (table[None, :] - t.float()[:, None]).abs().argmin(dim=1)
    return table[index]


class InjectionSession:
    """What an :meth:`IdentityInjector.active` block hands out: its identity, the calls made, the records."""

    def __init__(self, identity: PuLIDIdentity) -> None:
        self.identity = identity
        self.calls = 0
        self.call: TransformerCall | None = None

    @property
    def records(self) -> list[Any]:
        return self.identity.records


def _token_layout(img_ids: Any, total: int) -> tuple[int, tuple[int, int] | None]:
    """``(generated tokens, (rows, cols) or None)`` from a call's ``img_ids`` (one host read).

    FLUX pipelines number image tokens ``(0, row, col)``; Kontext's context tokens carry 1 first.
    """
    if not isinstance(img_ids, torch.Tensor):
        return total, None
    ids = img_ids.detach()
    if ids.ndim == 3:
        ids = ids[0]
    ids = ids.to("cpu", torch.float32)
    generated = int((ids[:, 0] == 0).sum())
    if generated == 0:
        return total, None
    head = ids[:generated]
    rows, cols = int(head[:, 1].max()) + 1, int(head[:, 2].max()) + 1
    return generated, ((rows, cols) if rows * cols == generated else None)


class IdentityInjector:
    """PuLID-FLUX CA modules hooked into a diffusers FLUX transformer (see the module docstring).

    Args:
        transformer: a ``diffusers.FluxTransformer2DModel`` (anything with ``transformer_blocks``
            and ``single_transformer_blocks`` whose blocks return ``(text, image)``).
        ca_modules: the CA modules in checkpoint order, one per injection point.
        double_interval / single_interval: a CA runs after double block ``i`` when
            ``i % double_interval == 0``, then after single block ``j`` when ``j % single_interval == 0``.
        scheduler: the pipeline's scheduler; its ``step_index`` numbers the denoising steps and
            its ``sigmas`` give the exact time of each step. Without one, calls are counted.
    """

    def __init__(
        self,
        transformer: nn.Module,
        ca_modules: Sequence[nn.Module],
        double_interval: int = 2,
        single_interval: int = 4,
        scheduler: Any = None,
    ) -> None:
        if HookRegistry is None:  # pragma: no cover
            raise RuntimeError("spatialid needs diffusers >= 0.35 (its hook registry)")
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
        if getattr(transformer, "_spatialid_injector", None) is not None:
            raise RuntimeError("this transformer already has PuLID hooks; unload them first (unload_pulid)")
        self.transformer = transformer
        self.ca_modules = ca_modules if isinstance(ca_modules, nn.ModuleList) else nn.ModuleList(ca_modules)
        self.double_interval = double_interval
        self.single_interval = single_interval
        self.points = points
        self.scheduler = scheduler
        self._blocks = [double_blocks[i] if s == "double" else single_blocks[i] for s, i in points]
        self._standing: PuLIDIdentity | None = None  # the identity of an active() block
        self._text_tokens = 0  # text tokens before the image tokens in a joint-stream block's output
        self._active_sigmas: torch.Tensor | None = None
        self._session: InjectionSession | None = None
        self._converted: tuple[Any, PuLIDIdentity] | None = None
        self._counter = CallCounter(1)
        self._order = (-1, 0)  # (step, calls seen in it): the branch by call order without a context
        self._cache_signature: Any = None
        self._entered_context: Any = None
        self.users = 0  # pipelines loaded on this transformer (spatialid.loaders.load_pulid)
        self.scale = 1.0  # multiplies every identity's id_weight (set_pulid_scale)
        self.last_identity: PuLIDIdentity | None = None
        self.last_layout: tuple[int | None, tuple[int, int]] | None = None
        self.calls = 0  # transformer calls with identity (eager only; counters are not traced)
        self.full_calls = 0  # of those, calls whose last injection point ran (not skipped by a step cache)
        self._reset_call()
        self._probe: Any = attach_context_probe(transformer)
        HookRegistry.check_if_exists_or_initialize(transformer).register_hook(CallHook(self), CALL_HOOK)
        self._installed_forward = vars(transformer).get("forward")
        for index, block in enumerate(self._blocks):
            register_innermost(block, PointHook(self, index), POINT_HOOK)
        from spatialid.injection.words import readable_attention, word_blocks

        # people bound to words: their attention maps come from the middle double blocks' attention
        attns = [getattr(double_blocks[i], "attn", None) for i in word_blocks(len(double_blocks))]
        self._word_attns = [a for a in attns if a is not None and readable_attention(a)]
        for attn in self._word_attns:
            register_innermost(attn, WordsHook(self), WORDS_HOOK)
        transformer._spatialid_injector = self
        self._attached = True

    # ------------------------------------------------------------------ public API
    @property
    def attached(self) -> bool:
        return self._attached

    @property
    def call(self) -> TransformerCall | None:
        """The current (or last) transformer call's step and branch, while it carries an identity."""
        return self._call

    @property
    def session(self) -> InjectionSession | None:
        """The :meth:`active` block's session, or None."""
        return self._session

    @contextlib.contextmanager
    def active(
        self,
        identity: Any,
        id_weight: float | None = None,
        schedule: Any = None,
        grid: tuple[int, int] | None = None,
        record_masks: bool = False,
        calls_per_step: int = 1,
        generated_tokens: int | None = None,
        regions: torch.Tensor | None = None,
        record_dtype: torch.dtype = torch.float16,
        sigmas: torch.Tensor | None = None,
        **identity_kwargs: Any,
    ) -> Iterator[InjectionSession]:
        """Inject ``identity`` into every transformer call made inside the ``with`` block.

        For driving the transformer (or :meth:`begin_call` / :meth:`inject`) without a pipeline:
        ``identity`` is a :class:`PuLIDIdentity`, or its ``tokens`` (one person's ``[B|1, n, dim]``
        tensor, a list of them) with ``id_weight``, ``schedule`` (a ``SpatialSchedule``, a preset
        name, or None = uniform, the default), ``grid`` (rows, cols), ``record_masks``, ``regions``
        (``[K, rows, cols]`` bounds) and any other :class:`PuLIDIdentity` field as keywords.
        ``calls_per_step`` numbers calls without a cache context (2: cond, then uncond);
        ``sigmas`` are the sampler's exact times (the phase is decided from them, as a scheduler's).
        A call that carries its own ``joint_attention_kwargs["identity"]`` uses that one.
        """
        if not self._attached:
            raise RuntimeError("this IdentityInjector was detached; create a new one")
        if self._session is not None:
            raise RuntimeError("IdentityInjector.active() blocks cannot be nested")
        if id_weight is not None and (isinstance(id_weight, bool) or not isinstance(id_weight, (int, float)) or not math.isfinite(id_weight)):
            raise ValueError(f"id_weight must be a finite number, got {id_weight!r}")
        if isinstance(identity, PuLIDIdentity):
            ident = identity
        else:
            kwargs = dict(identity_kwargs)
            if id_weight is not None:
                kwargs["id_weight"] = float(id_weight)
            kwargs["preset"] = schedule
            if grid is not None:
                rows, cols = (int(v) for v in grid)
                if rows < 1 or cols < 1:
                    raise ValueError(f"grid must be two positive integers (rows, cols), got {grid!r}")
                kwargs["height"], kwargs["width"] = rows * 16, cols * 16
            if regions is not None:
                if not isinstance(regions, torch.Tensor) or regions.ndim != 3:
                    raise ValueError("regions must be a tensor [persons, rows, cols] of upper bounds in [0, 1]")
                kwargs["regions"] = list(regions.unbind(0))
            ident = PuLIDIdentity(identity, record_masks=record_masks, record_dtype=record_dtype, **kwargs)
        ident._generated_tokens = generated_tokens
        self._standing = ident
        self._active_sigmas = sigmas
        self._counter = CallCounter(calls_per_step)
        self._probe.subscribe(self._counter)
        self._order = (-1, 0)
        session = InjectionSession(ident)
        self._session = session
        try:
            yield session
        finally:
            self._probe.unsubscribe(self._counter)
            self._standing = None
            self._active_sigmas = None
            self._session = None
            self._reset_call()

    def begin_call(
        self, hidden_states: torch.Tensor | None, timestep: Any = None, identity: Any = None, img_ids: Any = None
    ) -> TransformerCall:
        """Start one transformer call: number it and prepare what :meth:`inject` reads.

        ``identity`` is the call's own (from ``joint_attention_kwargs``); default: the
        :meth:`active` block's. The transformer's hook calls this with the call's arguments; call
        it directly to drive injection points without running the transformer.
        """
        ident = self._identity_of(identity)
        self._reset_call()
        if ident is None:
            raise RuntimeError("IdentityInjector.begin_call() needs an identity or an active() block")
        call = self._number_call(ident)
        if self._session is not None:
            self._session.calls += 1
            self._session.call = call
        self._call = call
        self._ident = ident
        self.last_identity = ident
        if not ident.injects or (call.step < ident.start_step and not ident.binds_words):
            return call  # (people bound to words gather their maps before start_step too)
        if hidden_states is None:
            raise RuntimeError("IdentityInjector could not find hidden_states in the transformer call")
        self._prepare(ident, call, hidden_states, timestep, img_ids)
        return call

    def inject(self, point: int, image_tokens: torch.Tensor) -> torch.Tensor:
        """``h + w * sum_k M_k * CA(Z_k, h)`` for injection point ``point`` of the current call.

        ``image_tokens`` is ``[B, N, dim]``, the image stream after that point's block; returns it
        unchanged when the current call is not injected.
        """
        if not self._on:
            return image_tokens
        n = self._generated
        if image_tokens.shape[1] > n:  # context tokens after the generated ones stay as they are
            return torch.cat([self._inject(point, image_tokens[:, :n]), image_tokens[:, n:]], dim=1)
        return self._inject(point, image_tokens)

    def detach(self) -> None:
        """Remove every hook (the context probe too); the transformer is the plain model again."""
        if not self._attached:
            return
        registry = HookRegistry.check_if_exists_or_initialize(self.transformer)
        remove_hook_keeping_wrappers(self.transformer, CALL_HOOK, self._installed_forward)
        for block in self._blocks:
            HookRegistry.check_if_exists_or_initialize(block).remove_hook(POINT_HOOK, recurse=False)
        for attn in self._word_attns:
            HookRegistry.check_if_exists_or_initialize(attn).remove_hook(WORDS_HOOK, recurse=False)
        registry.invalidate_child_registries_cache()
        detach_context_probe(self.transformer, self._probe)
        self._probe = None
        if getattr(self.transformer, "_spatialid_injector", None) is self:
            del self.transformer._spatialid_injector
        self._attached = False
        self._standing = None
        self._session = None

    def __repr__(self) -> str:
        return (
            f"IdentityInjector(points={len(self.points)}, double_interval={self.double_interval}, "
            f"single_interval={self.single_interval}, attached={self.attached})"
        )

    # ------------------------------------------------------------------ per call
    def _reset_call(self) -> None:
        self._on = False
        self._call: TransformerCall | None = None
        self._ident: PuLIDIdentity | None = None
        self._tokens: torch.Tensor | None = None
        self._t: torch.Tensor | None = None
        self._weight: torch.Tensor | None = None
        self._layout: Any = None
        self._grid = (0, 0)
        self._generated = 0
        self._record: torch.Tensor | None = None
        self._replay: torch.Tensor | None = None
        self._mask_fn: Any = identity_masks
        self._words_capture: tuple[Any, ...] | None = None  # what the words hooks accumulate into

    def _identity_of(self, value: Any) -> PuLIDIdentity | None:
        if value is None:
            return self._standing
        if isinstance(value, PuLIDIdentity):
            return value
        # a mapping or a bare tensor: converted once per object, so its records are kept
        if self._converted is None or self._converted[0] is not value:
            self._converted = (value, as_identity(value))
        return self._converted[1]

    def _number_call(self, ident: PuLIDIdentity | None) -> TransformerCall:
        """The call's step and CFG branch, from one rule.

        A cache context that names its ``step_index`` gives the step; else a pipeline call (its
        identity in ``joint_attention_kwargs``) takes the step from the scheduler (``step_index`` counted from ``begin_index``, so img2img's first executed step is
        step 0); an :meth:`active` block counts calls. The branch is diffusers' cache context
        (``"cond"`` / ``"uncond"``) where the pipeline sets one, else the call order in the step
        (the positive branch first, as every FLUX.1 pipeline calls it).
        """
        probe = self._probe
        scheduler = self.scheduler
        context_step = probe.step_index if probe.name is not None else None
        if scheduler is not None and (ident is None or ident is not self._standing) and context_step is None:
            # A pipeline call: nothing here changes between pipeline calls, so a compiled graph
            # made for one serves the next (only the step becomes a dynamic int).
            index = getattr(scheduler, "step_index", None)
            begin = getattr(scheduler, "begin_index", None) or 0
            step = 0 if index is None else index - begin
            if probe.name is not None:
                return TransformerCall(2 * step + (probe.name == "uncond"), step, probe.name, True)
            last, seen = self._order
            seen = seen + 1 if last == step else 1
            self._order = (step, seen)
            branch = "cond" if seen == 1 else "uncond"
            return TransformerCall(2 * step + (seen != 1), step, branch, False)
        counter = self._counter
        if counter.pending or probe.name is None:
            return counter.next()
        return counter.next(probe.name, probe.step_index)

    def _prepare(
        self, ident: PuLIDIdentity, call: TransformerCall, hidden: torch.Tensor, timestep: Any, img_ids: Any
    ) -> None:
        param = next(self.ca_modules.parameters())
        if param.device != hidden.device:
            raise RuntimeError(
                f"the CA modules are on {param.device} but the transformer runs on {hidden.device}; "
                f"put them there: pipe.to({str(hidden.device)!r}) (enable_*_cpu_offload() places them "
                f"itself), or injector.ca_modules.to({str(hidden.device)!r}) when driving IdentityInjector directly"
            )
        batch, total = hidden.shape[0], hidden.shape[1]
        people = ident.people_tokens
        if call.branch == "uncond":
            people = ident.uncond_people_tokens
            if people is None:
                raise IdentityError(
                    "true CFG needs the zero-identity (uncond) tokens: pass an IdentityEmbedding or uncond_tokens"
                )
        if people.shape[1] not in (1, batch):
            raise IdentityError(
                f"identity tokens have batch {people.shape[1]} but the transformer batch is {batch}; "
                "give one embedding per sample or a single one for all"
            )
        kv_dim = getattr(self.ca_modules[0], "kv_dim", people.shape[-1])
        if people.shape[-1] != kv_dim:
            raise IdentityError(
                f"identity tokens have width {people.shape[-1]} but these PuLID modules expect {kv_dim}; "
                "encode the photo with the same model"
            )
        rows, cols, generated = self._token_grid(ident, total, img_ids)
        schedule = ident.schedule
        if schedule is not None and timestep is None:
            raise RuntimeError("a spatial schedule needs the transformer's `timestep` argument")
        self._tokens = people.to(device=param.device, dtype=param.dtype).expand(-1, batch, -1, -1)
        self._weight = ident._weight.to(param.device)
        if self.scale != 1.0:
            self._weight = self._weight * self.scale
        self._grid, self._generated = (rows, cols), generated
        self.last_layout = (None if generated == total else generated, (rows, cols))
        if timestep is not None:
            t = torch.as_tensor(timestep, device=hidden.device).float().reshape(-1)
            sigmas = self._active_sigmas if ident is self._standing else None
            if sigmas is None and self.scheduler is not None:
                sigmas = getattr(self.scheduler, "sigmas", None)
            if schedule is not None and isinstance(sigmas, torch.Tensor):
                t = snap_to_schedule(t, sigmas)
            self._t = t.expand(batch) if t.numel() == 1 else t
        elif ident.record_masks:
            self._t = torch.full((batch,), float("nan"), device=hidden.device)
        regions = ident.region_grid(rows, cols)
        sigma = schedule.center_sigma if schedule is not None else 0.3
        self._layout = build_layout(ident.count, rows, cols, sigma, regions, param.device)
        injecting = call.step >= ident.start_step  # False: a step before start_step gathering word maps only
        table = ident.replay_table(len(self.points), batch, rows, cols, self._replay_steps(ident))
        if table is not None and call.branch != "uncond" and injecting:
            if call.step >= table.shape[0]:
                raise IdentityError(f"the replayed mask file has no masks for step {call.step}")
            self._replay = table[call.step].to(param.device)
        if ident.record_masks and injecting:
            self._record = self._record_slot(ident, call, batch, rows * cols, param.device)
        if ident.binds_words:
            self._bind_words(ident, call, batch, rows, cols, sigma, param.device, injecting)
        self._mask_fn = fused_identity_masks if use_fused("auto", param.device) else identity_masks
        self._on = injecting

    def _bind_words(
        self, ident: PuLIDIdentity, call: TransformerCall, batch: int, rows: int, cols: int, sigma: float,
        device: torch.device, injecting: bool,
    ) -> None:
        """The layout of people bound to words, and the attention capture of this call (words.call_layout)."""
        from spatialid.injection.words import call_layout

        if not self._word_attns:
            raise IdentityError("people bound to words need FLUX's double-stream attention; this transformer has none readable")
        if self._text_tokens and ident._words[3] >= self._text_tokens:
            raise IdentityError(
                f"a person's words are at text token {ident._words[3]} but the call has {self._text_tokens} text tokens"
            )
        self._layout, self._words_capture = call_layout(
            ident, call, self._layout, batch, rows, cols, sigma, self._t, device, injecting
        )

    def _replay_steps(self, ident: PuLIDIdentity) -> range:
        """The steps this pipeline call injects (all of them need replayed masks)."""
        executed = self._scheduled_steps() - int(getattr(self.scheduler, "begin_index", None) or 0)
        return range(ident.start_step, max(executed, ident.start_step))

    def _scheduled_steps(self) -> int:
        """Steps of the scheduler's current schedule (0 without a scheduler or a schedule)."""
        timesteps = getattr(self.scheduler, "timesteps", None) if self.scheduler is not None else None
        return int(timesteps.shape[0]) if isinstance(timesteps, torch.Tensor) else 0

    def _token_grid(self, ident: PuLIDIdentity, total: int, img_ids: Any) -> tuple[int, int, int]:
        """``(rows, cols, generated tokens)`` of this call."""
        if ident.height is not None and ident.width is not None:
            rows, cols = ident.height // 16, ident.width // 16
            if rows * cols > total:
                raise IdentityError(
                    f"the identity's size {ident.width}x{ident.height} has {rows * cols} image tokens but the call has "
                    f"{total}; give the size of the generated image"
                )
            return rows, cols, rows * cols  # tokens after these (Kontext's context image) get no identity
        generated = ident._generated_tokens or total
        if not torch.compiler.is_compiling() and isinstance(img_ids, torch.Tensor):
            generated, grid = _token_layout(img_ids, total)
            if grid is not None:
                return grid[0], grid[1], generated
        if ident.schedule is None and ident.simple:
            return 1, generated, generated  # uniform injection of one person needs no grid
        side = math.isqrt(generated)
        if side * side != generated:
            raise IdentityError(
                f"{generated} image tokens do not form a square grid; give the identity height= and width= "
                "(PuLIDIdentity(..., height=H, width=W))"
            )
        return side, side, generated

    def _record_slot(self, ident: PuLIDIdentity, call: TransformerCall, batch: int, n: int, device: torch.device) -> torch.Tensor:
        """This call's row of the identity's preallocated record buffers (``[points, K, B, N]``)."""
        buffers = ident._record
        shape = (len(self.points), ident.count, batch, n)
        if buffers is None or tuple(buffers[0].shape[2:]) != shape or buffers[0].shape[0] <= call.step:
            if buffers is not None and torch.compiler.is_compiling():
                raise IdentityError("the record buffers do not fit this call; record one call per identity object")
            size = max(self._scheduled_steps(), call.step + 1, 1)
            if buffers is not None and tuple(buffers[0].shape[2:]) == shape:
                size = max(size, 2 * buffers[0].shape[0])  # an active() block without a scheduler: grow
            old = buffers
            ident.prepare_records(size, len(self.points), batch, n, device)
            buffers = ident._record
            if old is not None and tuple(old[0].shape[2:]) == shape:
                keep = old[0].shape[0]
                for new, previous in zip(buffers, old):
                    new[:keep] = previous
        masks, times, phases, filled, calls = buffers
        b = 1 if call.branch == "uncond" else 0
        filled[call.step, b] = True
        calls[call.step, b] = call.index
        if self._t is not None:
            times[call.step, b] = self._t[0]
        if ident.schedule is not None and self._t is not None:
            phases[call.step, b] = phase_index(ident.schedule, time_column(self._t[:1])).reshape(())
        return masks[call.step, b]

    def _inject(self, point: int, image: torch.Tensor) -> torch.Tensor:
        ca = self.ca_modules[point]
        people = self._tokens  # [K, B, n, dim]
        latents = image.to(people.dtype)
        schedule = self._ident.schedule
        rows, cols = self._grid
        replay = self._replay
        want_probs = replay is None and schedule is not None and schedule.needs_attention_probs
        if want_probs:
            deltas, raws, probs = ca.forward_people(people, latents, return_probs=True)
        else:
            (deltas, raws), probs = ca.forward_people(people, latents), None
        if replay is not None:
            masks = replay[point].to(device=image.device, dtype=torch.float32)
        else:
            masks = self._mask_fn(schedule, self._t, raws, rows, cols, self._layout, attn_probs=probs)
        if masks is not None:
            masks = masks.to(raws.dtype)  # the precision of the CA's response
        if self._record is not None:
            self._record[point].copy_(masks.detach() if masks is not None else torch.ones_like(self._record[point]))
        if masks is None:  # uniform injection of one person: image + w * delta in one pass
            return torch.addcmul(image, self._weight, deltas[0].to(image.dtype))
        weighted = masks.to(image.dtype).unsqueeze(-1) * self._weight  # [K, B, N, 1]
        out = image
        for k in range(deltas.shape[0]):  # K is static: unrolled under torch.compile
            out = torch.addcmul(out, weighted[k], deltas[k].to(image.dtype))
        return out
