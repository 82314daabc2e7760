"""pytest plugin for tools/diffusers_flux_tests.py: PuLID loaded on every FLUX.1 / Chroma pipeline diffusers' tests build.

``SPATIALID_PULID_MODE`` says what it does:

* ``plain``: nothing (the baseline);
* ``loaded``: every ``Flux*Pipeline`` / ``Chroma*Pipeline`` built (``__init__``, so ``from_pretrained``
  and ``from_pipe`` too) gets ``load_pulid`` with random CA modules sized to its transformer; no
  identity is passed, so each output must be the plain pipeline's;
* ``weight0``: as ``loaded``, and every call also carries a ``PuLIDIdentity`` of weight 0 in
  ``joint_attention_kwargs`` (the hooks run, take the identity out, add nothing).

``SPATIALID_OFFLINE_SUBSTITUTES=1`` replaces the two tiny hub models the dummy components read
(``hf-internal-testing/tiny-random-t5`` config and tokenizer, ``hf-internal-testing/tiny-random-clip``
tokenizer) with in-code equivalents (spatialid's tiny tokenizers, a T5 config of the same widths), so
the suite runs without hub access; tests that compare against recorded output values then fail in
every mode alike, which the comparison with ``plain`` leaves out.
"""

from __future__ import annotations

import functools
import inspect
import math
import os
from typing import Any

MODE = os.environ.get("SPATIALID_PULID_MODE", "plain")
SUBSTITUTES = os.environ.get("SPATIALID_OFFLINE_SUBSTITUTES") == "1"
_T5, _CLIP = "hf-internal-testing/tiny-random-t5", "hf-internal-testing/tiny-random-clip"


def _pulid_for(transformer: Any) -> Any:
    """A PuLIDFluxModel whose CA modules fit ``transformer`` (random weights; never called with weight 0)."""
    from spatialid.models.checkpoint import build_pulid_model
    from spatialid.models.configs import TINY_PULID, PerceiverCAConfig, PuLIDFluxConfig

    cfg = transformer.config
    width = int(cfg.num_attention_heads) * int(cfg.attention_head_dim)
    num_ca = math.ceil(int(cfg.num_layers) / 2) + math.ceil(int(cfg.num_single_layers) / 4)
    config = PuLIDFluxConfig(
        idformer=TINY_PULID.idformer, ca=PerceiverCAConfig(dim=width, dim_head=8, heads=2, kv_dim=TINY_PULID.ca.kv_dim),
        num_ca=num_ca, double_interval=2, single_interval=4,
    )
    return build_pulid_model(config)


def _attach(pipe: Any) -> None:
    from spatialid.loaders.pulid import load_pulid

    transformer = getattr(pipe, "transformer", None)
    if transformer is None or not hasattr(transformer, "single_transformer_blocks"):
        return
    load_pulid(pipe, _pulid_for(transformer))


def _zero_identity() -> Any:
    import torch

    from spatialid.loaders import PuLIDIdentity
    from spatialid.models.configs import TINY_PULID

    shape = (1, TINY_PULID.idformer.num_queries, TINY_PULID.ca.kv_dim)
    return PuLIDIdentity(torch.zeros(shape), torch.zeros(shape), id_weight=0.0)


def _patch_pipelines() -> None:
    import diffusers

    for name in dir(diffusers):
        if not (name.startswith(("Flux", "Chroma")) and name.endswith("Pipeline")):
            continue
        try:
            cls = getattr(diffusers, name)
        except Exception:  # noqa: BLE001 - an optional backend missing for that pipeline
            continue
        if "__init__" in cls.__dict__ and not getattr(cls.__init__, "_spatialid", False):
            init = cls.__init__

            @functools.wraps(init)
            def patched_init(self: Any, *args: Any, __init: Any = init, **kwargs: Any) -> None:
                __init(self, *args, **kwargs)
                _attach(self)

            patched_init._spatialid = True  # type: ignore[attr-defined]
            cls.__init__ = patched_init
        if MODE == "weight0" and "__call__" in cls.__dict__ and not getattr(cls.__call__, "_spatialid", False):
            call = cls.__call__
            if "joint_attention_kwargs" not in inspect.signature(call).parameters:
                continue

            @functools.wraps(call)
            def patched_call(self: Any, *args: Any, __call: Any = call, **kwargs: Any) -> Any:
                jak = dict(kwargs.get("joint_attention_kwargs") or {})
                jak["identity"] = _zero_identity()
                kwargs["joint_attention_kwargs"] = jak
                return __call(self, *args, **kwargs)

            patched_call._spatialid = True  # type: ignore[attr-defined]
            cls.__call__ = patched_call


def _substitute_hub_models() -> None:
    """The dummy components' two hub reads, made in code (same widths: T5 d_model 32)."""
    import transformers
    from transformers import T5Config

    from spatialid.pipeline.tiny import build_tiny_tokenizers

    clip_tok, t5_tok = build_tiny_tokenizers()
    t5_tok.model_max_length = 512

    def config(orig: Any) -> Any:
        def from_pretrained(name: Any, *args: Any, **kwargs: Any) -> Any:
            if str(name) == _T5:
                return T5Config(vocab_size=1103, d_model=32, d_ff=37, d_kv=8, num_heads=4, num_layers=5,
                                relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0,
                                eos_token_id=1, is_encoder_decoder=True)
            return orig(name, *args, **kwargs)

        return from_pretrained

    def tokenizer(orig: Any) -> Any:
        def from_pretrained(name: Any, *args: Any, **kwargs: Any) -> Any:
            if str(name) == _T5:
                return t5_tok
            if str(name) == _CLIP:
                return clip_tok
            return orig(name, *args, **kwargs)

        return from_pretrained

    transformers.AutoConfig.from_pretrained = config(transformers.AutoConfig.from_pretrained)
    for cls in (transformers.AutoTokenizer, transformers.CLIPTokenizer, transformers.T5TokenizerFast):
        cls.from_pretrained = tokenizer(cls.from_pretrained)


def pytest_configure(config: Any) -> None:
    if SUBSTITUTES:
        _substitute_hub_models()
    if MODE != "plain":
        _patch_pipelines()
