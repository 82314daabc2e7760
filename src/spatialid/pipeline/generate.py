"""One identity call, for every FLUX.1 pipeline: settings checked, identity built, pipeline called.

:meth:`SpatialIDPipeline.__call__` and :class:`~spatialid.pipeline.variants.IdentityPipelineRunner`
(img2img, inpainting, Fill, Kontext, ControlNet, Control) both run :func:`run_identity_call`:

1. the settings are checked (prompt, sizes, steps, weights) before anything runs;
2. photos are encoded and embeddings read (:func:`identity_for_call`): one person or several,
   with regions, a bound (the inpainting mask), recorded masks to replay;
3. the diffusers pipeline's own ``__call__`` runs with the :class:`PuLIDIdentity` in
   ``joint_attention_kwargs`` (the one loader, :mod:`spatialid.loaders.pulid`);
4. the recorded masks and the settings record come back in a :class:`SpatialIDPipelineOutput`.
"""

from __future__ import annotations

import contextvars
import logging
import os
import secrets
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch

from spatialid import __version__
from spatialid import defaults as D
from spatialid.injection.identity import IDENTITY_KEY, IdentityError, PuLIDIdentity, resolve_person
from spatialid.pipeline.outputs import TINY_NOTE, SpatialIDPipelineOutput, collect_step_masks, seed_generators
from spatialid.pipeline.settings import GenerationSettings, check_generation_settings, check_prompt

__all__ = ["describe_sources", "identity_for_call", "run_identity_call"]

_log = logging.getLogger("spatialid.pipeline")


def describe_sources(source: Any) -> list[str]:
    """File names (or kinds) of photos for the settings record."""
    items = source if isinstance(source, (list, tuple)) else [source]
    names = []
    for item in items:
        if isinstance(item, (str, os.PathLike)):
            names.append(Path(item).name)
        elif isinstance(item, PIL.Image.Image):
            names.append(getattr(item, "filename", "") and Path(item.filename).name or "<PIL image>")
        elif isinstance(item, np.ndarray):
            names.append(f"<array {tuple(item.shape)}>")
        else:
            names.append(f"<{type(item).__name__}>")
    return names


def _person(base: Any, id_image: Any, id_embeds: Any, uncond: Any) -> tuple[torch.Tensor, Any, dict[str, Any]]:
    """One person's ``(tokens, uncond, info)`` from photos (encoded by ``base``) or an encoded identity."""
    if id_image is not None and id_embeds is not None:
        raise IdentityError("give either id_image or id_embeds, not both")
    if id_image is not None:
        emb = base.encode_identity(id_image)
        tokens, uncond_tokens, info = resolve_person(emb, uncond)
        info = {**info, "source": "image", "files": describe_sources(id_image)}
    else:
        tokens, uncond_tokens, info = resolve_person(id_embeds, uncond)
    num_queries = getattr(getattr(base, "idformer", None), "num_queries", None)
    if id_image is not None or not isinstance(id_embeds, torch.Tensor):
        if num_queries and tokens.shape[1] != num_queries:
            raise IdentityError(
                f"the identity has {tokens.shape[1]} tokens but this model's IDFormer makes {num_queries}; "
                "encode the photo with the same model"
            )
    cas = getattr(base, "ca_modules", None)
    kv_dim = getattr(cas[0], "kv_dim", tokens.shape[-1]) if cas else tokens.shape[-1]
    if tokens.shape[-1] != kv_dim:
        raise IdentityError(
            f"identity tokens have width {tokens.shape[-1]} but this model's PuLID modules expect {kv_dim}; "
            "encode the photo with the same model (e.g. `spatialid encode --model tiny` for the tiny model)"
        )
    return tokens, uncond_tokens, info


def identity_for_call(
    base: Any,
    *,
    id_image: Any = None,
    id_embeds: Any = None,
    people: Sequence[Any] | None = None,
    uncond_id_embeds: Any = None,
    need_uncond: bool = False,
) -> tuple[list[torch.Tensor], list[Any] | None, dict[str, Any], list[dict[str, Any]] | None]:
    """Each person's ``tokens``, their uncond tokens (or None), the identity record and each person's record.

    ``people`` (several people: photos, lists of photos, embeddings or files, one entry each) and
    ``id_image``/``id_embeds`` (one person) are exclusive; none of them gives no identity.
    """
    if people is not None:
        from spatialid.injection.people import check_people_count, split_person

        if id_image is not None or id_embeds is not None:
            raise IdentityError("give people=[...] (several people) or id_image/id_embeds (one person), not both")
        if isinstance(people, (str, os.PathLike)) or not isinstance(people, Sequence):
            raise IdentityError("people must be a list with one entry per person (a photo, a list of photos or an embedding)")
        check_people_count(len(people))
        resolved = [_person(base, *split_person(p), uncond_id_embeds) for p in people]
        infos = [r[2] for r in resolved]
        info: dict[str, Any] = {"source": "people", "people": infos}
    elif id_image is None and id_embeds is None:
        return [], None, {"source": None}, None
    else:
        resolved = [_person(base, id_image, id_embeds, uncond_id_embeds)]
        infos, info = None, resolved[0][2]
    tokens = [r[0] for r in resolved]
    uncond = [r[1] for r in resolved]
    if need_uncond and any(u is None for u in uncond):
        raise IdentityError(
            "true CFG needs the zero-identity (uncond) tokens; pass an IdentityEmbedding or uncond_id_embeds"
        )
    return tokens, (uncond if all(u is not None for u in uncond) else None), info, infos


def run_identity_call(
    call: Callable[..., Any],
    base: Any,
    *,
    prompt: str | list[str] | None,
    id_image: Any = None,
    id_embeds: Any = None,
    people: Sequence[Any] | None = None,
    regions: Sequence[Any] | None = None,
    bound: Any = None,
    preset: Any = D.DEFAULT_PRESET,
    id_weight: float = D.DEFAULT_ID_WEIGHT,
    start_step: int = D.DEFAULT_START_STEP,
    true_cfg: float = D.DEFAULT_TRUE_CFG,
    negative_prompt: str | list[str] | None = "",
    cfg_start_step: int = D.DEFAULT_CFG_START_STEP,
    guidance_scale: float = D.DEFAULT_GUIDANCE,
    num_inference_steps: int | None = None,
    height: int | None = None,
    width: int | None = None,
    generator: Any = None,
    seed: int | None = None,
    num_images_per_prompt: int = 1,
    return_masks: bool = False,
    uncond_id_embeds: Any = None,
    save_masks: str | os.PathLike[str] | None = None,
    masks_from: str | os.PathLike[str] | None = None,
    max_sequence_length: int | None = None,
    schedule_overrides: dict[str, float] | None = None,
    noise: str = D.DEFAULT_NOISE,
    output_type: str = "pil",
    return_dict: bool = True,
    pipeline_inputs: dict[str, Any] | None = None,
    pipeline_record: dict[str, Any] | None = None,
    identity_size: tuple[int, int] | None | str = "call",
    has_true_cfg: bool = True,
    **flux_kwargs: Any,
) -> SpatialIDPipelineOutput | tuple:
    """Generate with ``call`` (a diffusers FLUX.1 pipeline's ``__call__``) and ``base``'s identity encoder.

    ``base`` is the :class:`~spatialid.pipeline.SpatialIDPipeline` that owns the identity encoder,
    the model info and the default size/steps. ``pipeline_inputs`` are the diffusers pipeline's
    own arguments (``image``, ``mask_image``, ``strength``, ``control_image``, ...);
    ``pipeline_record`` what the settings record says of them. ``bound`` is one upper bound for
    every person's mask (the inpainting mask). ``identity_size`` is the generated image's size the
    identity is told (``"call"``: height x width; None: read from the call's ``img_ids``).
    See :meth:`SpatialIDPipeline.__call__` for the other arguments.
    """
    from spatialid.masks import apply_overrides, resolve_preset

    steps = int(num_inference_steps if num_inference_steps is not None else base.default_num_inference_steps)
    height = int(height if height is not None else base.default_height)
    width = int(width if width is not None else base.default_width)
    max_len = int(max_sequence_length if max_sequence_length is not None else base.default_max_sequence_length)
    if flux_kwargs.get("prompt_embeds") is None:
        check_prompt(prompt)
        warn_if_truncated(base, prompt, max_len)
    check_generation_settings(
        num_inference_steps=steps, height=height, width=width, id_weight=id_weight, start_step=start_step,
        true_cfg=true_cfg, guidance_scale=guidance_scale, num_images_per_prompt=num_images_per_prompt, seed=seed,
    )
    if not isinstance(cfg_start_step, int) or isinstance(cfg_start_step, bool) or cfg_start_step < 0:
        raise IdentityError(f"cfg_start_step must be a whole number >= 0, got {cfg_start_step!r}")
    preset_name = preset if isinstance(preset, str) else ("pulid" if preset is None else "custom")
    schedule = apply_overrides(resolve_preset(preset), schedule_overrides)
    if schedule is None:
        schedule_overrides = None  # uniform injection: nothing was overridden
    if noise not in D.NOISE_MODES:
        raise IdentityError(f"noise must be one of {', '.join(D.NOISE_MODES)}, got {noise!r}")
    use_true_cfg = float(true_cfg) > 1.0
    if use_true_cfg and not has_true_cfg:
        raise IdentityError("this pipeline has no true CFG; use true_cfg=1 (--true-cfg 1)")
    identity_given = id_image is not None or id_embeds is not None or bool(people)
    if identity_given and getattr(base, "injector", None) is None:
        raise IdentityError(
            "this pipeline has no PuLID modules; build it with SpatialIDPipeline.from_pretrained(...) or .tiny()"
        )
    need_uncond = use_true_cfg and float(id_weight) > 0
    people, words = _people_words(people)
    word_tokens = _word_tokens(base, prompt, words, max_len) if words else None  # before any photo is encoded
    tokens, uncond, identity_info, people_info = identity_for_call(
        base, id_image=id_image, id_embeds=id_embeds, people=people, uncond_id_embeds=uncond_id_embeds,
        need_uncond=need_uncond,
    )
    if (regions is not None or masks_from is not None) and not tokens:
        raise IdentityError("regions and masks_from need an identity (id_image, id_embeds or people)")
    for info, person_words in zip(people_info or [], words or []):
        if person_words is not None:
            info["words"] = person_words

    batch = 1 if isinstance(prompt, str) or prompt is None else len(prompt)
    total = batch * int(num_images_per_prompt)
    seeds: list[int] | None = None
    if generator is None:
        if seed is None:
            seed = secrets.randbelow(2**32)
        seeds = [int(seed) + i for i in range(total)]
        generator = seed_generators(int(seed), total)
    if noise == "reference" and flux_kwargs.get("latents") is None:
        if seeds is None:
            raise IdentityError('noise="reference" needs seed=..., not generator=...')
        flux_kwargs["latents"] = base.reference_noise(seeds, height, width)

    inject = bool(tokens) and float(id_weight) > 0.0
    warmup = use_true_cfg and cfg_start_step > 0
    recording = (return_masks or save_masks is not None) and inject
    size = (height, width) if identity_size == "call" else identity_size
    identity = None
    if inject or warmup:
        identity = PuLIDIdentity(
            tokens if inject else None,
            uncond if inject else None,
            id_weight=float(id_weight) if inject else 0.0,
            preset=schedule,
            start_step=int(start_step),
            cfg_start_step=int(cfg_start_step) if use_true_cfg else 0,
            regions=list(_region_list(regions)) if regions is not None and inject else None,
            region=bound if inject else None,
            record_masks=recording,
            record_dtype=torch.float32 if save_masks is not None else torch.float16,
            masks_from=masks_from if inject else None,
            height=size[0] if size else None,
            width=size[1] if size else None,
            word_tokens=word_tokens if inject else None,
        )
    call_kwargs: dict[str, Any] = dict(
        prompt=prompt,
        height=height,
        width=width,
        num_inference_steps=steps,
        guidance_scale=float(guidance_scale),
        num_images_per_prompt=int(num_images_per_prompt),
        generator=generator,
        max_sequence_length=max_len,
        output_type=output_type,
        return_dict=True,
        **(pipeline_inputs or {}),
        **flux_kwargs,
    )
    if use_true_cfg:
        call_kwargs["true_cfg_scale"] = float(true_cfg)
        if flux_kwargs.get("negative_prompt_embeds") is None:
            # FluxPipeline enables true CFG only when a negative prompt is given; "" is valid.
            neg = negative_prompt if negative_prompt is not None else ""
            if isinstance(neg, str) and isinstance(prompt, list):
                neg = [neg] * len(prompt)  # one negative per prompt, as FluxPipeline expects
            call_kwargs["negative_prompt"] = neg
    if identity is not None:
        jak = dict(call_kwargs.get("joint_attention_kwargs") or {})
        jak[IDENTITY_KEY] = identity
        call_kwargs["joint_attention_kwargs"] = jak
    out = call(**call_kwargs)

    rows, cols = height // 16, width // 16
    layout = getattr(getattr(base, "injector", None), "last_layout", None)
    if layout is not None and identity is not None and identity.injects:
        rows, cols = layout[1]
    records = identity.records if recording and identity is not None else None
    if save_masks is not None:
        from spatialid.injection.people import save_mask_file

        binds = identity is not None and identity.binds_words
        save_mask_file(save_masks, records or [], rows, cols, identity.layout_maps if binds else None, words)
    masks = collect_step_masks(records, rows, cols) if return_masks and records else None
    if return_masks and masks is None:
        masks = []
    from spatialid.injection.people import describe_region

    record = GenerationSettings(
        prompt=prompt if pipeline_record is None or isinstance(prompt, str) else prompt[0],
        negative_prompt=negative_prompt if use_true_cfg else None,
        preset=preset_name,
        id_weight=float(id_weight),
        start_step=int(start_step),
        true_cfg=float(true_cfg),
        cfg_start_step=int(cfg_start_step) if use_true_cfg else None,
        guidance=float(guidance_scale),
        steps=steps,
        width=width,
        height=height,
        seed=seeds[0] if seeds else None,
        num_images=total,
        max_sequence_length=max_len,
        schedule_overrides=dict(schedule_overrides) if schedule_overrides else None,
        noise=noise,
        people=[list((info or {}).get("files") or []) for info in people_info] if people_info else None,
        regions=[describe_region(r) for r in _region_list(regions)] if regions is not None else None,
    )
    settings = {
        "version": __version__,
        **record.to_dict(),
        **(pipeline_record or {}),
        "seeds": seeds,
        "schedule": schedule.to_dict() if schedule is not None else None,
        "identity": identity_info,
        "identity_injected": bool(inject),
        **({"masks_from": Path(masks_from).name} if masks_from is not None else {}),
        "offload": getattr(base, "_offload_mode", None),
        **(getattr(base, "model_info", None) or {}),
    }
    if getattr(base, "is_tiny", False):
        settings["note"] = TINY_NOTE
    result = SpatialIDPipelineOutput(images=out.images, masks=masks, settings=settings)
    if not return_dict:
        return (result.images, masks, settings)
    return result


def _people_words(people: Sequence[Any] | None) -> tuple[Sequence[Any] | None, list[str | None] | None]:
    """``people`` without their words, and each person's words (None when nobody is bound to words)."""
    if people is None or isinstance(people, (str, os.PathLike)) or not isinstance(people, Sequence):
        return people, None
    from spatialid.injection.words import person_words

    pairs = [person_words(entry) for entry in people]
    if all(words is None for _, words in pairs):
        return people, None
    return [entry for entry, _ in pairs], [words for _, words in pairs]


def _word_tokens(base: Any, prompt: Any, words: Sequence[str | None], max_len: int) -> list[Any]:
    """Each person's text-token positions in the prompt(s) (one list per prompt for several), None without words."""
    from spatialid.injection.words import word_token_indices

    tokenizer = getattr(base, "tokenizer_2", None)
    if tokenizer is None:
        raise IdentityError("people bound to words need the pipeline's T5 tokenizer (tokenizer_2); this pipeline has none")
    if prompt is None:
        raise IdentityError("people bound to words need the prompt text; give prompt=..., not prompt_embeds")
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    out: list[Any] = []
    for k, person_words in enumerate(words):
        if person_words is None:
            out.append(None)
            continue
        found = [word_token_indices(tokenizer, p, person_words, max_len, who=f"person {k + 1}") for p in prompts]
        out.append(found[0] if len(found) == 1 else found)
    return out


def _region_list(regions: Any) -> list[Any]:
    from spatialid.injection.people import region_list

    return region_list(regions)


class TruncationNotice:
    """One job of many calls (a bench run): the truncation warning said once, with that job's advice.

    Enter it around the calls (``with notice:``); ``count`` is how many prompts were cut.
    """

    def __init__(self, advice: str) -> None:
        self.advice = advice
        self.count = 0
        self._tokens: list[Any] = []

    def __enter__(self) -> TruncationNotice:
        self._tokens.append(_NOTICE.set(self))
        return self

    def __exit__(self, *exc: object) -> None:
        _NOTICE.reset(self._tokens.pop())


_NOTICE: contextvars.ContextVar[TruncationNotice | None] = contextvars.ContextVar("spatialid_truncation", default=None)


def warn_if_truncated(base: Any, prompt: str | list[str], max_len: int) -> None:
    """Say so when the text encoders will cut the prompt (diffusers' own notice is silenced); inside a
    :class:`TruncationNotice`, only for the first prompt cut, with its advice."""
    tokenizer = getattr(base, "tokenizer_2", None)
    if tokenizer is None:
        return
    notice = _NOTICE.get()
    for text in [prompt] if isinstance(prompt, str) else list(prompt):
        count = len(tokenizer(text, truncation=False, add_special_tokens=True).input_ids)
        if count <= max_len:
            continue
        advice = "raise --max-sequence-length, up to 512, or shorten it" if notice is None else notice.advice
        if notice is not None:
            notice.count += 1
            if notice.count > 1:
                continue
        _log.warning(
            "the prompt is %d T5 tokens long; only the first %d are used (%s); CLIP reads only the first 77%s",
            count, max_len, advice, "" if notice is None else " (said once per run, for the first such prompt)",
        )
