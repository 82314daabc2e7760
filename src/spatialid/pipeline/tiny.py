"""Toy-size FLUX.1 components built in-process with random weights (the offline ``tiny`` preset).

Everything here uses the real architectures (diffusers' ``FluxTransformer2DModel`` and
``AutoencoderKL``, transformers' ``CLIPTextModel`` and ``T5EncoderModel``, FLUX's flow-matching
scheduler configuration) at toy width, so the whole generation path -- prompt encoding, identity
injection hooks, the sampler, VAE decoding, metadata, pictures -- runs on any CPU in seconds without
a single file from a model hub. The weights are random: the images are noise by nature. The tiny
preset exists to exercise and show the full path, never to judge image quality.

Tokenizers are built in code too (a small WordPiece vocabulary of common prompt words plus single
characters, so any ASCII prompt is represented and different prompts give different token ids).
Same ``seed`` -> bit-identical components, in any process.
"""

from __future__ import annotations

import string
from typing import Any

import torch

from spatialid.models.configs import TINY_FLUX, TinyFluxConfig

__all__ = [
    "FLUX_SCHEDULER_CONFIG",
    "TINY_CLIP_MAX_LENGTH",
    "build_tiny_chroma_components",
    "build_tiny_chroma_transformer",
    "build_tiny_flux_components",
    "build_tiny_tokenizers",
]

# FlowMatchEulerDiscreteScheduler settings of black-forest-labs/FLUX.1-dev (scheduler_config.json).
FLUX_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}

# CLIP's context length (FluxPipeline reads it from tokenizer.model_max_length).
TINY_CLIP_MAX_LENGTH = 77

# Words common in portrait prompts get one token each; anything else is spelt out by characters.
_WORDS = """
a an the of in on at with and or by for from to is are as into over under near wearing holding
photo portrait picture painting drawing sketch render illustration cinematic close-up closeup
man woman person boy girl child old young face smiling smile happy serious looking camera eyes
hair beard glasses hat suit dress shirt jacket coat helmet astronaut space suit armor uniform
city street park beach forest mountain snow rain night day sunset sunrise studio light lighting
background blurred bokeh detailed realistic high quality sharp soft warm cold colorful black white
red green blue yellow orange purple pink brown gray gold silver oil watercolor anime cartoon style
standing sitting walking running reading coffee cup book flower flowers dog cat car bike window
room office kitchen garden library cafe stage concert sky sea ocean river lake desert field
""".split()


def _wordpiece_vocab(specials: list[str]) -> dict[str, int]:
    """Specials first (fixed ids), then characters, continuation characters and the word list."""
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    tokens = specials + chars + ["##" + c for c in chars] + sorted(set(_WORDS))
    vocab: dict[str, int] = {}
    for tok in tokens:
        vocab.setdefault(tok, len(vocab))
    return vocab


def _make_fast_tokenizer(
    specials: list[str],
    template: str,
    *,
    unk: str,
    bos: str | None,
    eos: str,
    pad: str,
    model_max_length: int,
) -> Any:
    """A tokenizers-library WordPiece pipeline wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece
    from transformers import PreTrainedTokenizerFast

    vocab = _wordpiece_vocab(specials)
    tok = Tokenizer(WordPiece(vocab=vocab, unk_token=unk, max_input_chars_per_word=64))
    tok.normalizer = normalizers.Sequence([normalizers.NFKD(), normalizers.StripAccents(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single=template,
        special_tokens=[(s, vocab[s]) for s in specials if s in template],
    )
    kwargs: dict[str, Any] = {"unk_token": unk, "eos_token": eos, "pad_token": pad}
    if bos is not None:
        kwargs["bos_token"] = bos
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=model_max_length, **kwargs)


def build_tiny_tokenizers(config: TinyFluxConfig = TINY_FLUX) -> tuple[Any, Any]:
    """Return ``(clip_tokenizer, t5_tokenizer)`` built entirely in code (no vocabulary files).

    The CLIP-like tokenizer adds ``<|startoftext|> ... <|endoftext|>`` and pads with the end token,
    as OpenAI's CLIP tokenizer does, so ``CLIPTextModel`` pools at the first end token. The T5-like
    one ends with ``</s>`` and pads with ``<pad>`` (id 0), as T5's does.
    """
    clip = _make_fast_tokenizer(
        ["<|startoftext|>", "<|endoftext|>", "[UNK]"],
        "<|startoftext|> $A <|endoftext|>",
        unk="[UNK]",
        bos="<|startoftext|>",
        eos="<|endoftext|>",
        pad="<|endoftext|>",
        model_max_length=TINY_CLIP_MAX_LENGTH,
    )
    t5 = _make_fast_tokenizer(
        ["<pad>", "</s>", "<unk>"],
        "$A </s>",
        unk="<unk>",
        bos=None,
        eos="</s>",
        pad="<pad>",
        model_max_length=config.text_max_length,
    )
    return clip, t5


def build_tiny_transformer(config: TinyFluxConfig = TINY_FLUX, *, guidance_embeds: bool = True) -> Any:
    """A ``FluxTransformer2DModel`` of the tiny size (random weights from torch's current RNG).

    FLUX.1-dev's block types and guidance embedding at toy width: ``in_channels`` is the VAE's
    latent channels packed 2x2, the rotary axes sum to the head dimension. ``guidance_embeds=False``
    is FLUX.1-schnell's transformer (no guidance embedding).
    """
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=config.latent_channels * 4,
        num_layers=config.num_layers,
        num_single_layers=config.num_single_layers,
        attention_head_dim=config.attention_head_dim,
        num_attention_heads=config.num_attention_heads,
        joint_attention_dim=config.joint_attention_dim,
        pooled_projection_dim=config.pooled_projection_dim,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=tuple(config.axes_dims_rope),
    )


def build_tiny_chroma_transformer(config: TinyFluxConfig = TINY_FLUX) -> Any:
    """A ``ChromaTransformer2DModel`` of the tiny size (random weights from torch's current RNG).

    Chroma's blocks at the tiny FLUX widths: the same double/single block counts and attention
    sizes (so the tiny PuLID modules fit as the published ones fit Chroma), no pooled CLIP input and
    no guidance embedding; its modulation comes from the small approximator network instead.
    """
    from diffusers import ChromaTransformer2DModel

    return ChromaTransformer2DModel(
        patch_size=1,
        in_channels=config.latent_channels * 4,
        num_layers=config.num_layers,
        num_single_layers=config.num_single_layers,
        attention_head_dim=config.attention_head_dim,
        num_attention_heads=config.num_attention_heads,
        joint_attention_dim=config.joint_attention_dim,
        axes_dims_rope=tuple(config.axes_dims_rope),
        approximator_num_channels=16,
        approximator_hidden_dim=32,
        approximator_layers=1,
    )


def build_tiny_chroma_components(
    seed: int = 0, config: TinyFluxConfig = TINY_FLUX, dtype: torch.dtype = torch.float32
) -> dict[str, Any]:
    """Every ChromaPipeline component at toy size, deterministically from ``seed``.

    The VAE, T5 and its tokenizer are the tiny FLUX ones of the same ``seed`` (Chroma uses FLUX's
    VAE and T5 without CLIP); the transformer is :func:`build_tiny_chroma_transformer`.
    """
    parts = build_tiny_flux_components(seed, config, dtype, _transformer=build_tiny_chroma_transformer)
    return {
        "transformer": parts["transformer"],
        "vae": parts["vae"],
        "text_encoder": parts["text_encoder_2"],
        "tokenizer": parts["tokenizer_2"],
        "scheduler": parts["scheduler"],
    }


def build_tiny_flux_components(
    seed: int = 0,
    config: TinyFluxConfig = TINY_FLUX,
    dtype: torch.dtype = torch.float32,
    *,
    guidance_embeds: bool = True,
    _transformer: Any = None,
) -> dict[str, Any]:
    """Build every FluxPipeline component at toy size, deterministically from ``seed``.

    Returns a dict with the keys FluxPipeline's constructor takes (``transformer``, ``vae``,
    ``text_encoder``, ``text_encoder_2``, ``tokenizer``, ``tokenizer_2``, ``scheduler``). The VAE
    keeps FLUX's 8x down-sampling (four resolution levels) so image token grids are
    ``(height // 16, width // 16)`` exactly as with the real model. ``guidance_embeds=False``
    builds FLUX.1-schnell's transformer (no guidance embedding).
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    tokenizer, tokenizer_2 = build_tiny_tokenizers(config)
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        if _transformer is not None:
            transformer = _transformer(config)
        else:
            transformer = build_tiny_transformer(config, guidance_embeds=guidance_embeds)
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 8, 16, 16),
            layers_per_block=1,
            latent_channels=config.latent_channels,
            norm_num_groups=4,
            sample_size=64,
            scaling_factor=0.3611,  # FLUX VAE values
            shift_factor=0.1159,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
        torch.manual_seed(seed + 2)
        clip_cfg = CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=config.pooled_projection_dim,  # FluxPipeline uses the pooled output directly
            intermediate_size=2 * config.pooled_projection_dim,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=TINY_CLIP_MAX_LENGTH,
            projection_dim=config.pooled_projection_dim,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        text_encoder = CLIPTextModel(clip_cfg)
        torch.manual_seed(seed + 3)
        t5_cfg = T5Config(
            vocab_size=len(tokenizer_2),
            d_model=config.joint_attention_dim,
            d_kv=8,
            d_ff=2 * config.joint_attention_dim,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            feed_forward_proj="gated-gelu",  # as T5 v1.1 (FLUX's text encoder)
            pad_token_id=tokenizer_2.pad_token_id,
            eos_token_id=tokenizer_2.eos_token_id,
            decoder_start_token_id=tokenizer_2.pad_token_id,
            is_encoder_decoder=False,
            use_cache=False,
        )
        text_encoder_2 = T5EncoderModel(t5_cfg)
    finally:
        torch.random.set_rng_state(gen_state)

    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG)
    for module in (transformer, vae, text_encoder, text_encoder_2):
        module.eval()
        module.requires_grad_(False)
        if dtype != torch.float32:
            # nn.Module.to: diffusers' ModelMixin.to warns about fp32-only layers, which these toy
            # models do not have.
            torch.nn.Module.to(module, dtype=dtype)
    return {
        "transformer": transformer,
        "vae": vae,
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2,
        "scheduler": scheduler,
    }
