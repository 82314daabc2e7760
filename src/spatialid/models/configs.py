"""Configurations of the PuLID-FLUX modules: the published (full) size and the offline tiny size.

The full values are those of the public PuLID-FLUX v0.9.x checkpoint. The tiny values keep every
architectural rule (same module classes, same key names) at toy width so that the whole chain
(identity encoder -> IDFormer -> CA modules -> FLUX) can run on a CPU in seconds with random weights.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class IDFormerConfig:
    """Shape of :class:`spatialid.IDFormer` (PuLID-FLUX identity encoder)."""

    dim: int = 1024
    depth: int = 10
    dim_head: int = 64
    heads: int = 16
    num_id_token: int = 5
    num_queries: int = 32
    output_dim: int = 2048
    ff_mult: int = 4
    id_cond_dim: int = 1280  # ArcFace (512) + EVA-CLIP class embedding (768)
    vit_dim: int = 1024  # width of the EVA-CLIP hidden states fed to the five mapping MLPs
    # Hidden width of the five mapping MLPs and of id_embedding_mapping. The reference constructor
    # fixes it at 1024 whatever ``dim`` is; it is last so positional construction keeps working.
    mapping_dim: int = 1024

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PerceiverCAConfig:
    """Shape of one :class:`spatialid.PerceiverAttentionCA` (identity -> image cross-attention)."""

    dim: int = 3072  # FLUX hidden width (image tokens)
    dim_head: int = 128
    heads: int = 16
    kv_dim: int = 2048  # identity token width (IDFormer output_dim)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PuLIDFluxConfig:
    """Everything stored in a PuLID-FLUX checkpoint plus where the CA modules go in FLUX."""

    idformer: IDFormerConfig = field(default_factory=IDFormerConfig)
    ca: PerceiverCAConfig = field(default_factory=PerceiverCAConfig)
    num_ca: int = 20
    double_interval: int = 2  # CA after double blocks 0, 2, ..., 18
    single_interval: int = 4  # then after single blocks 0, 4, ..., 36

    def to_dict(self) -> dict:
        return {
            "idformer": self.idformer.to_dict(),
            "ca": self.ca.to_dict(),
            "num_ca": self.num_ca,
            "double_interval": self.double_interval,
            "single_interval": self.single_interval,
        }


@dataclass(frozen=True)
class TinyFluxConfig:
    """Toy FLUX transformer / VAE / text-encoder sizes used by the offline tiny preset."""

    num_layers: int = 4  # double-stream blocks
    num_single_layers: int = 8
    attention_head_dim: int = 16
    num_attention_heads: int = 2
    axes_dims_rope: tuple[int, int, int] = (4, 6, 6)  # sums to attention_head_dim
    latent_channels: int = 4  # VAE latent channels; packed 2x2 -> transformer in_channels = 16
    joint_attention_dim: int = 32  # T5 hidden size
    pooled_projection_dim: int = 32  # CLIP text projection size
    text_max_length: int = 32

    @property
    def inner_dim(self) -> int:
        return self.attention_head_dim * self.num_attention_heads


PULID_FLUX = PuLIDFluxConfig()
TINY_FLUX = TinyFluxConfig()
TINY_PULID = PuLIDFluxConfig(
    idformer=IDFormerConfig(
        dim=32,
        depth=5,
        dim_head=8,
        heads=2,
        num_id_token=2,
        num_queries=4,
        output_dim=32,
        ff_mult=2,
        id_cond_dim=160,  # tiny identity encoder: dlib 128-d descriptor + 32-d tiny EVA02 embedding
        vit_dim=32,  # tiny identity encoder: width of the tiny EVA02 tower's hidden states
        mapping_dim=32,  # explicit: the tiny weights (and their random init) predate this field
    ),
    ca=PerceiverCAConfig(dim=TINY_FLUX.inner_dim, dim_head=8, heads=2, kv_dim=32),
    num_ca=4,  # 4 double blocks / 2 + 8 single blocks / 4
    double_interval=2,
    single_interval=4,
)
