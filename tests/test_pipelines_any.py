"""Identity on every FLUX.1 pipeline of diffusers through ``load_pulid`` (tiny random-weight components, offline).

For each pipeline: batch 2 with identity, with and without true CFG where the pipeline has it;
``id_weight=0`` equals the plain diffusers pipeline bit for bit; the identity residual touches
only the generated image's tokens (Kontext) and only the inpainting region (inpainting). Then the
CLI: img2img / inpainting / Kontext / ControlNet / LoRA through ``spatialid generate``, and the
one-line errors of bad input.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from spatialid.cli.main import main
from spatialid.encoder.identity_encoder import tiny_pulid_modules
from spatialid.loaders import PuLIDIdentity, load_pulid, pulid_loader, unload_pulid
from spatialid.models.configs import TINY_FLUX, TINY_PULID
from spatialid.pipeline.tiny import build_tiny_flux_components

SIZE = 64
STEPS = 2
C = TINY_FLUX.latent_channels


# ----------------------------------------------------------------------------- fixtures


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def components() -> dict[str, Any]:
    return build_tiny_flux_components(0)


@pytest.fixture(scope="module")
def pulid() -> tuple[Any, Any]:
    return tiny_pulid_modules(0)


@pytest.fixture(scope="module")
def identity_tokens() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    shape = (1, TINY_PULID.idformer.num_queries, TINY_PULID.ca.kv_dim)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def _photo(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))


def _mask() -> Image.Image:
    """White = repaint: the left half of the picture."""
    array = np.zeros((SIZE, SIZE), dtype=np.uint8)
    array[:, : SIZE // 2] = 255
    return Image.fromarray(array)


def _transformer_with_channels(components: dict[str, Any], in_channels: int) -> Any:
    """The tiny transformer with another input width (Fill / Control concatenate conditions)."""
    from diffusers import FluxTransformer2DModel

    config = {k: v for k, v in components["transformer"].config.items() if not k.startswith("_")}
    config.update(in_channels=in_channels, out_channels=C * 4)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model = FluxTransformer2DModel(**config)
    return model.eval().requires_grad_(False)


def _build(kind: str, components: dict[str, Any]) -> Any:
    import diffusers

    parts = dict(components)
    if kind == "fill":
        parts["transformer"] = _transformer_with_channels(components, C * 4 * 2 + 8 * 8 * 4)
    elif kind == "control":
        parts["transformer"] = _transformer_with_channels(components, C * 4 * 2)
    cls = {
        "flux": diffusers.FluxPipeline,
        "img2img": diffusers.FluxImg2ImgPipeline,
        "inpaint": diffusers.FluxInpaintPipeline,
        "fill": diffusers.FluxFillPipeline,
        "kontext": diffusers.FluxKontextPipeline,
        "controlnet": diffusers.FluxControlNetPipeline,
        "control": diffusers.FluxControlPipeline,
    }[kind]
    if kind == "controlnet":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(4)
            parts["controlnet"] = diffusers.FluxControlNetModel.from_transformer(
                components["transformer"], num_layers=1, num_single_layers=1,
                attention_head_dim=TINY_FLUX.attention_head_dim, num_attention_heads=TINY_FLUX.num_attention_heads,
            ).eval().requires_grad_(False)
    import inspect

    names = set(inspect.signature(cls.__init__).parameters)
    pipe = cls(**{k: v for k, v in parts.items() if k in names})
    pipe.set_progress_bar_config(disable=True)
    return pipe


_INPUTS = {
    "flux": dict,
    "img2img": lambda: {"image": _photo(), "strength": 0.75},
    "inpaint": lambda: {"image": _photo(), "mask_image": _mask(), "strength": 0.9},
    "fill": lambda: {"image": _photo(), "mask_image": _mask()},
    "kontext": lambda: {"image": _photo(), "_auto_resize": False, "max_area": SIZE * SIZE},
    "controlnet": lambda: {"control_image": _photo(1), "controlnet_conditioning_scale": 0.7},
    "control": lambda: {"control_image": _photo(1)},
}
HAS_TRUE_CFG = {"flux", "img2img", "inpaint", "kontext", "controlnet"}
KINDS = list(_INPUTS)


def _call(pipe: Any, kind: str, identity: Any = None, cfg: bool = False) -> torch.Tensor:
    kwargs: dict[str, Any] = dict(
        prompt="portrait of a woman",
        height=SIZE,
        width=SIZE,
        num_inference_steps=STEPS,
        num_images_per_prompt=2,
        max_sequence_length=16,
        output_type="pt",
        generator=[torch.Generator().manual_seed(7 + i) for i in range(2)],
        **_INPUTS[kind](),
    )
    if cfg:
        kwargs.update(true_cfg_scale=2.0, negative_prompt="blurry")
    if identity is not None:
        kwargs["joint_attention_kwargs"] = {"identity": identity}
    with torch.no_grad():
        return pipe(**kwargs).images


@pytest.fixture(scope="module")
def pipelines(components, pulid) -> dict[str, Any]:
    return {kind: _build(kind, components) for kind in KINDS}


# ----------------------------------------------------------------------------- every pipeline


@pytest.mark.parametrize("kind", KINDS)
def test_identity_on_pipeline(kind, pipelines, pulid, identity_tokens):
    """Batch 2 with identity (and true CFG where there is one); id_weight 0 = the plain pipeline bit for bit."""
    pipe = pipelines[kind]
    tokens, uncond = identity_tokens
    plain = {cfg: _call(pipe, kind, cfg=cfg) for cfg in ([False, True] if kind in HAS_TRUE_CFG else [False])}
    load_pulid(pipe, pulid, config=TINY_PULID)
    try:
        for cfg, reference in plain.items():
            zero = _call(pipe, kind, PuLIDIdentity(tokens, uncond, id_weight=0.0), cfg=cfg)
            assert torch.equal(zero, reference), f"{kind}: id_weight 0 differs from the plain pipeline (cfg={cfg})"
            with_id = _call(pipe, kind, PuLIDIdentity(tokens, uncond, id_weight=1.0, preset="paper"), cfg=cfg)
            assert with_id.shape == reference.shape and with_id.shape[0] == 2
            assert torch.isfinite(with_id).all()
            assert not torch.equal(with_id, reference), f"{kind}: identity changed nothing (cfg={cfg})"
        # a call without identity after one with it: plain again (the session closed)
        assert torch.equal(_call(pipe, kind), plain[False])
    finally:
        unload_pulid(pipe)
    assert torch.equal(_call(pipe, kind), plain[False]), f"{kind}: unload_pulid did not restore the pipeline"


def _capture_residual(pipe: Any, point_block: Any) -> tuple[list, list]:
    """Image-stream outputs of one injection block before and after the identity hook.

    "before" is read by a diffusers hook registered innermost on the block (inside the identity's
    own hook), "after" by a torch forward hook (outside every diffusers hook).
    """
    from diffusers.hooks.hooks import HookRegistry, ModelHook

    from spatialid.injection.hooks import register_innermost

    before: list[torch.Tensor] = []
    after: list[torch.Tensor] = []

    class Before(ModelHook):
        def post_forward(self, module, output):
            before.append(output[1].clone())
            return output

    register_innermost(point_block, Before(), "test_before")

    class Handle:
        def remove(self) -> None:
            HookRegistry.check_if_exists_or_initialize(point_block).remove_hook("test_before", recurse=False)

    handles = [Handle(), point_block.register_forward_hook(lambda m, i, o: after.append(o[1].clone()))]
    return before, after, handles


def test_kontext_identity_only_in_generated_tokens(pipelines, pulid, identity_tokens):
    pipe = pipelines["kontext"]
    tokens, uncond = identity_tokens
    loader = load_pulid(pipe, pulid, config=TINY_PULID)
    before, after, handles = _capture_residual(pipe, pipe.transformer.transformer_blocks[0])
    try:
        _call(pipe, "kontext", PuLIDIdentity(tokens, uncond, preset="pulid"))
        generated, grid = loader.last_layout
    finally:
        for h in handles:
            h.remove()
        unload_pulid(pipe)
    n = (SIZE // 16) ** 2
    assert generated == n and grid == (SIZE // 16, SIZE // 16)
    for b, a in zip(before, after):
        assert b.shape[1] == 2 * n  # generated + context tokens
        residual = (a - b).abs().amax(dim=(0, 2))
        assert (residual[:n] > 0).all(), "every generated token gets identity under uniform PuLID"
        assert torch.equal(a[:, n:], b[:, n:]), "context-image tokens must stay unchanged"


@pytest.mark.parametrize("kind", ["inpaint", "fill"])
def test_inpainting_identity_only_in_region(kind, pipelines, pulid, identity_tokens):
    """Identity repair: the inpainting mask is the upper bound; outside it the residual is exactly zero."""
    pipe = pipelines[kind]
    tokens, uncond = identity_tokens
    load_pulid(pipe, pulid, config=TINY_PULID)
    before, after, handles = _capture_residual(pipe, pipe.transformer.single_transformer_blocks[0])
    try:
        for preset in ("pulid", "paper"):
            before.clear()
            after.clear()
            _call(pipe, kind, PuLIDIdentity(tokens, uncond, preset=preset, region=_mask()))
            rows = cols = SIZE // 16
            inside = torch.zeros(rows, cols, dtype=torch.bool)
            inside[:, : cols // 2] = True
            inside = inside.reshape(-1)
            for b, a in zip(before, after):
                residual = (a - b).abs().amax(dim=(0, 2))
                assert torch.equal(a[:, ~inside], b[:, ~inside]), f"{preset}: identity outside the inpainting region"
                assert (residual[inside] > 0).any()
    finally:
        for h in handles:
            h.remove()
        unload_pulid(pipe)


def test_identity_as_dict_and_bad_tokens(pipelines, pulid, identity_tokens):
    from spatialid.errors import SpatialIDError

    pipe = pipelines["img2img"]
    tokens, _ = identity_tokens
    load_pulid(pipe, pulid, config=TINY_PULID)
    try:
        a = _call(pipe, "img2img", {"tokens": tokens, "preset": "pulid"})
        b = _call(pipe, "img2img", PuLIDIdentity(tokens, preset="pulid"))
        assert torch.equal(a, b)
        with pytest.raises(SpatialIDError, match="width"):
            _call(pipe, "img2img", PuLIDIdentity(torch.zeros(1, 4, 7)))
        with pytest.raises(SpatialIDError, match="uncond"):
            _call(pipe, "img2img", PuLIDIdentity(tokens), cfg=True)
        assert pulid_loader(pipe) is not None
    finally:
        unload_pulid(pipe)
    assert pulid_loader(pipe) is None


# ----------------------------------------------------------------------------- LoRA (peft)


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory) -> Path:
    """A rank-2 LoRA on the tiny transformer (random A and B, so it changes the output)."""
    pytest.importorskip("peft")
    from diffusers import FluxPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    transformer = build_tiny_flux_components(0)["transformer"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        transformer.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False))
    folder = tmp_path_factory.mktemp("lora")
    FluxPipeline.save_lora_weights(folder, transformer_lora_layers=get_peft_model_state_dict(transformer))
    return folder / "pytorch_lora_weights.safetensors"


def test_lora_changes_output_and_unloading_restores(components, pulid, identity_tokens, lora_file):
    pipe = _build("flux", build_tiny_flux_components(0))
    tokens, uncond = identity_tokens
    load_pulid(pipe, pulid, config=TINY_PULID)
    identity = PuLIDIdentity(tokens, uncond, preset="paper")
    try:
        before = _call(pipe, "flux", identity)
        pipe.load_lora_weights(str(lora_file), adapter_name="test")
        with_lora = _call(pipe, "flux", identity)
        assert not torch.equal(with_lora, before)
        pipe.unload_lora_weights()
        assert torch.equal(_call(pipe, "flux", identity), before)
    finally:
        unload_pulid(pipe)


# ----------------------------------------------------------------------------- CLI

FAST = ["--model", "tiny", "--size", f"{SIZE}x{SIZE}", "--steps", str(STEPS), "--device", "cpu", "--seed", "3"]


def _run(argv: list[Any], capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(code: int, err: str, match: str) -> None:
    assert code == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("spatialid: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert match.lower() in lines[0].lower(), lines[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory, identity_tokens) -> dict[str, Path]:
    from spatialid.encoder.embedding import IdentityEmbedding

    root = tmp_path_factory.mktemp("cli")
    tokens, uncond = identity_tokens
    paths = {"embeds": IdentityEmbedding(tokens=tokens, uncond_tokens=uncond).save(root / "me.safetensors")}
    for name, image in (("photo", _photo()), ("mask", _mask()), ("control", _photo(1))):
        paths[name] = root / f"{name}.png"
        image.save(paths[name])
    paths["small_mask"] = root / "small_mask.png"
    _mask().resize((32, 32)).save(paths["small_mask"])
    return paths


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_cli_img2img_inpaint_kontext_controlnet(tmp_path, files, capsys, components):
    from spatialid.app.metadata import read_image_metadata

    base = [*FAST, "--prompt", "portrait", "--id-embeds", files["embeds"]]
    cases = {
        "img2img": ["--init-image", files["photo"], "--strength", "0.8"],
        "inpaint": ["--init-image", files["photo"], "--inpaint-mask", files["mask"]],
        "kontext": ["--kontext", "--init-image", files["photo"]],
    }
    import diffusers

    controlnet_dir = tmp_path / "controlnet"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4)
        diffusers.FluxControlNetModel.from_transformer(
            components["transformer"], num_layers=1, num_single_layers=1,
            attention_head_dim=TINY_FLUX.attention_head_dim, num_attention_heads=TINY_FLUX.num_attention_heads,
        ).save_pretrained(controlnet_dir)
    cases["controlnet"] = ["--control-image", files["control"], "--controlnet", controlnet_dir]
    for name, flags in cases.items():
        out = tmp_path / f"{name}.png"
        code, stdout, err = _run(["generate", *base, *flags, "--out", out], capsys)
        assert code == 0, err
        meta = read_image_metadata(out)
        assert meta["pipeline"] == name
        if name == "inpaint":
            assert meta["inpaint_mask"] == "mask.png"
        code, stdout, _ = _run(["info", out], capsys)
        assert code == 0 and name in stdout


def test_cli_lora_changes_output(tmp_path, files, capsys, lora_file):
    base = [*FAST, "--prompt", "portrait", "--id-embeds", files["embeds"]]
    plain, lora = tmp_path / "plain.png", tmp_path / "lora.png"
    assert _run(["generate", *base, "--out", plain], capsys)[0] == 0
    code, _, err = _run(["generate", *base, "--lora", f"{lora_file}:0.8", "--out", lora], capsys)
    assert code == 0, err
    assert not np.array_equal(_pixels(plain), _pixels(lora))
    from spatialid.app.metadata import read_image_metadata

    assert read_image_metadata(lora)["loras"] == [f"{lora_file.name}:0.8"]


def test_cli_bad_inputs_one_line_exit_2(tmp_path, files, capsys, components):
    base = [*FAST, "--prompt", "portrait", "--id-embeds", files["embeds"], "--out", tmp_path / "x.png"]
    code, _, err = _run(["generate", *base, "--init-image", files["photo"], "--inpaint-mask", files["small_mask"]], capsys)
    _one_line_error(code, err, "size")
    code, _, err = _run(["generate", *base, "--kontext"], capsys)
    _one_line_error(code, err, "--init-image")
    for strength in ("0", "1.5", "-1"):
        code, _, err = _run(["generate", *base, "--init-image", files["photo"], "--strength", strength], capsys)
        _one_line_error(code, err, "strength")
    code, _, err = _run(["generate", *base, "--inpaint-mask", files["mask"]], capsys)
    _one_line_error(code, err, "--init-image")
    code, _, err = _run(["generate", *base, "--control-image", files["control"]], capsys)
    _one_line_error(code, err, "--controlnet")
    # a LoRA whose shapes belong to another base model
    from safetensors.torch import save_file

    wrong = tmp_path / "wrong_lora.safetensors"
    save_file(
        {
            "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 3072),
            "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(3072, 2),
        },
        str(wrong),
    )
    code, _, err = _run(["generate", *base, "--lora", wrong], capsys)
    _one_line_error(code, err, "lora")
    other_keys = tmp_path / "sdxl_lora.safetensors"  # keys of another architecture
    save_file(
        {
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 320),
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(320, 2),
        },
        str(other_keys),
    )
    code, _, err = _run(["generate", *base, "--lora", other_keys], capsys)
    _one_line_error(code, err, "lora")
    code, _, err = _run(["generate", *base, "--lora", tmp_path / "missing.safetensors"], capsys)
    _one_line_error(code, err, "lora")
    # a ControlNet of another width
    import diffusers

    other = tmp_path / "other_controlnet"
    diffusers.FluxControlNetModel(
        in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[2, 2, 4],
    ).save_pretrained(other)
    code, _, err = _run(["generate", *base, "--control-image", files["control"], "--controlnet", other], capsys)
    _one_line_error(code, err, "controlnet")


def test_pipeline_names_match_defaults():
    from spatialid import defaults as D
    from spatialid.loaders.names import PIPELINE_CLASSES, parse_lora

    assert tuple(PIPELINE_CLASSES) == D.PIPELINES
    assert parse_lora("a/b.safetensors:0.5") == ("a/b.safetensors", 0.5)
    assert parse_lora("user/repo") == ("user/repo", 1.0)
    assert parse_lora("C:/loras/x.safetensors") == ("C:/loras/x.safetensors", 1.0)
