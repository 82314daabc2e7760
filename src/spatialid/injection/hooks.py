"""The diffusers hooks of the identity injection, and their agreement with diffusers' step caches.

:class:`CallHook` sits on the transformer (identity out of ``joint_attention_kwargs``, call
numbering, true CFG's warm-up); :class:`PointHook` on each block with a CA module, registered
innermost (:func:`register_innermost`) so that a step cache that skips a block skips its identity
too; :class:`WordsHook` on the attention of one or two middle double blocks reads FLUX's attention
to the words people are bound to (:mod:`spatialid.injection.words`). :func:`force_full_step_on_change` resets First Block Cache's state when what the injection
does changes between steps (the cached residual holds the old injection).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from spatialid.injection.identity import IDENTITY_KEY

try:
    from diffusers.hooks.hooks import HookRegistry, ModelHook
except ImportError:  # pragma: no cover - diffusers >= 0.35 is a dependency
    HookRegistry, ModelHook = None, object  # type: ignore[assignment,misc]

__all__ = [
    "CALL_HOOK", "POINT_HOOK", "WORDS_HOOK", "CallHook", "PointHook", "WordsHook", "cache_hooks",
    "force_full_step_on_change", "register_innermost",
]

CALL_HOOK = "spatialid_identity_call"
POINT_HOOK = "spatialid_identity_point"
WORDS_HOOK = "spatialid_identity_words"


class CallHook(ModelHook):  # type: ignore[misc,valid-type]
    """The transformer-level hook: identity out of the kwargs, numbering, CFG warm-up."""

    def __init__(self, injector: Any) -> None:
        super().__init__()
        self.injector = injector

    def pre_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        injector = self.injector
        value = None
        jak = kwargs.get("joint_attention_kwargs")
        if isinstance(jak, dict) and IDENTITY_KEY in jak:
            value = jak[IDENTITY_KEY]
            kwargs = {**kwargs, "joint_attention_kwargs": {k: v for k, v in jak.items() if k != IDENTITY_KEY}}
        injector._reset_call()
        caching, first_block = cache_hooks(injector.transformer)
        if value is None and injector._standing is None:
            if caching and injector._probe.name is None:  # a plain call: the caches still need a context
                self._enter_context(module, injector._number_call(None).branch)
            return args, kwargs
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        timestep = kwargs.get("timestep", args[3] if len(args) > 3 else None)
        text = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        injector._text_tokens = int(text.shape[1]) if isinstance(text, torch.Tensor) else 0
        call = injector.begin_call(hidden, timestep, identity=value, img_ids=kwargs.get("img_ids"))
        if not torch.compiler.is_compiling():
            injector.calls += 1
        if caching and injector._probe.name is None:  # diffusers' caches need a context; most pipelines set none
            self._enter_context(module, call.branch)
        if first_block:
            force_full_step_on_change(injector, injector._ident, call)
        return args, kwargs

    def _enter_context(self, module: nn.Module, branch: str) -> None:
        self.injector._entered_context = module.cache_context(branch)
        self.injector._entered_context.__enter__()

    def post_forward(self, module: nn.Module, output: Any) -> Any:
        injector = self.injector
        if injector._entered_context is not None:
            context, injector._entered_context = injector._entered_context, None
            context.__exit__(None, None, None)
        ident, call = injector._ident, injector._call
        if ident is None or call is None or ident.cfg_start_step == 0:
            return output
        # True CFG warm-up: before cfg_start_step the negative branch returns the positive output,
        # so the pipeline's mix neg + s * (pos - neg) is exactly pos (PuLID-FLUX's timestep_to_start_cfg).
        if call.step >= ident.cfg_start_step:
            return output
        sample = output[0] if isinstance(output, tuple) else output.sample
        if call.branch != "uncond":
            ident._positive = (call.step, sample)
            return output
        positive = ident._positive
        if positive is None or positive[0] != call.step:
            return output
        if isinstance(output, tuple):
            return (positive[1], *output[1:])
        output.sample = positive[1]
        return output


class PointHook(ModelHook):  # type: ignore[misc,valid-type]
    """Adds the identity residual to a block's image tokens (innermost on the block)."""

    def __init__(self, injector: Any, point: int) -> None:
        super().__init__()
        self.injector = injector
        self.point = point

    def post_forward(self, module: nn.Module, output: Any) -> Any:
        injector = self.injector
        if self.point == len(injector.points) - 1 and injector._ident is not None and not torch.compiler.is_compiling():
            injector.full_calls += 1  # the last block ran: a step cache did not skip this call
        if not injector._on:
            return output
        if isinstance(output, tuple) and len(output) == 2:  # (text, image): FLUX.1's blocks, Chroma's double blocks
            text, image = output
            return text, injector.inject(self.point, image)
        if isinstance(output, torch.Tensor) and output.dim() == 3:
            # a single block on the joint stream [text tokens, image tokens] (Chroma's single blocks)
            n_text = injector._text_tokens
            return torch.cat([output[:, :n_text], injector.inject(self.point, output[:, n_text:])], dim=1)
        raise RuntimeError(
            "transformer blocks must return (encoder_hidden_states, hidden_states) or the joint "
            "[text, image] hidden states; this diffusers version is not supported (need diffusers >= 0.35)"
        )


class WordsHook(ModelHook):  # type: ignore[misc,valid-type]
    """Accumulates each bound person's attention map from a block's joint attention (its inputs only).

    Passes through unless the current call captures (a positive branch of an identity with people
    bound to words, not replaying their maps); the attention itself runs unchanged.
    """

    def __init__(self, injector: Any) -> None:
        super().__init__()
        self.injector = injector

    def pre_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        capture = self.injector._words_capture
        if capture is None:
            return args, kwargs
        from spatialid.injection.words import word_maps

        hidden = kwargs.get("hidden_states", args[0] if args else None)
        text = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        rotary = kwargs.get("image_rotary_emb", args[3] if len(args) > 3 else None)
        if isinstance(hidden, torch.Tensor) and isinstance(text, torch.Tensor):
            index, weight, gate, acc = capture
            maps = word_maps(module, hidden[:, : self.injector._generated], text, rotary, index, weight)
            acc.add_(maps * gate[None, :, None])
        return args, kwargs


def register_innermost(module: nn.Module, hook: Any, name: str) -> None:
    """Register ``hook`` as the innermost of ``module``'s diffusers hooks.

    diffusers' newest hook wraps the others, so a step cache enabled after us sees our output as
    the block's. When hooks are already there (a cache enabled before ``load_pulid``), they are
    taken off and put back after ours, in their order, through the registry's public methods.
    """
    registry = HookRegistry.check_if_exists_or_initialize(module)
    existing = [(n, registry.get_hook(n)) for n in list(getattr(registry, "_hook_order", registry.hooks))]
    for n, _ in reversed(existing):
        registry.remove_hook(n, recurse=False)
    registry.register_hook(hook, name)
    for n, h in existing:
        registry.register_hook(h, n)


def cache_hooks(transformer: nn.Module) -> tuple[bool, bool]:
    """``(any diffusers cache enabled, First Block Cache enabled)`` on this transformer.

    diffusers' caches put their hooks on the first block (First Block Cache) or on its
    attention (TaylorSeer, Pyramid Attention Broadcast); reading those two registries keeps
    this cheap and stable for a compiled graph's guards.
    """
    block = transformer.transformer_blocks[0]
    names = list(getattr(getattr(block, "_diffusers_hook", None), "hooks", {}))
    names += list(getattr(getattr(getattr(block, "attn", None), "_diffusers_hook", None), "hooks", {}))
    caching = any(name not in (POINT_HOOK, WORDS_HOOK) for name in names)
    return caching, any(name.startswith("fbc") for name in names)


@torch.compiler.disable
def force_full_step_on_change(injector: Any, ident: Any, call: Any) -> None:
    """Force a full step when what the injection does changes (a cached residual holds the old one)."""
    signature: Any = ("off",)
    if ident is not None and ident.injects and call.step >= ident.start_step:
        signature = ("on", "uniform")
        schedule = ident.schedule
        sigmas = getattr(injector.scheduler, "sigmas", None) if injector.scheduler is not None else None
        if schedule is not None and isinstance(sigmas, torch.Tensor):
            begin = getattr(injector.scheduler, "begin_index", None) or 0
            index = min(call.step + int(begin), sigmas.numel() - 1)
            signature = ("on", schedule.phase(float(sigmas.reshape(-1)[index])))
    if signature == injector._cache_signature:
        return
    injector._cache_signature = signature
    from diffusers.hooks.hooks import StateManager

    for block in [*injector.transformer.transformer_blocks, *injector.transformer.single_transformer_blocks]:
        registry = getattr(block, "_diffusers_hook", None)
        if registry is None:
            continue
        for hook in registry.hooks.values():
            if not hook._is_stateful:
                continue
            managers = [v for v in vars(hook).values() if isinstance(v, StateManager)]
            contexts = []
            for manager in managers:
                with contextlib.suppress(ValueError):
                    contexts.append((manager, manager.context))
            hook.reset_state(block)  # public: diffusers' reset of a stateful hook
            for manager, context in contexts:
                manager.set_context(context)
