"""People bound to words of the prompt (issue 22): word tokens, FLUX's attention to them, layouts.

A bound person's layout prior and territory come from the attention between the image tokens and
that person's T5 tokens during the layout steps. Checked here on constructed attention (a FLUX
attention whose image queries are built to match chosen text keys) and on synthetic maps injected
through the real hook path of the tiny pipeline, for 2, 3 and 4 people; words twice; words absent;
the CLI and Python; record/replay bit for bit; people without words unchanged.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from spatialid.injection import words as W
from spatialid.masks import multi
from spatialid.masks.compute import Layout, bind_words, build_layout

pytest.importorskip("diffusers")

PROMPT = "a photo of the boy and the girl with a man and a woman"
WORDS = ["boy", "girl", "man", "woman"]
ROWS = COLS = 8
STEPS = 6


@pytest.fixture(scope="module")
def tokenizer(tiny_pipe_plain):
    return tiny_pipe_plain.tokenizer_2


@pytest.fixture(scope="module")
def ids(tiny_pipe_plain):
    g = torch.Generator().manual_seed(11)
    kv = tiny_pipe_plain.ca_modules[0].kv_dim
    return [torch.randn(1, 4, kv, generator=g) for _ in range(4)], torch.randn(1, 4, kv, generator=g)


def _quadrants() -> list[torch.Tensor]:
    """Four token regions on the 8x8 grid, in an order the left-to-right strips would get wrong."""
    boxes = [(0.5, 0.0, 1.0, 0.5), (0.0, 0.5, 0.5, 1.0), (0.0, 0.0, 0.5, 0.5), (0.5, 0.5, 1.0, 1.0)]
    return [multi.box_region(b, ROWS, COLS).reshape(-1) for b in boxes]


def _owner(territories: torch.Tensor) -> torch.Tensor:
    return territories[:, 0].argmax(dim=0)  # [N]: whose territory is highest at each token


# ----------------------------------------------------------------------------- word -> T5 tokens


def test_word_tokens_all_occurrences_case_and_one_line_errors(tokenizer):
    prompt = "The boy and the girl, then the boy again"
    ids = list(tokenizer(prompt).input_ids)
    found = W.word_token_indices(tokenizer, prompt, "the boy", 32)
    pattern = list(tokenizer("the boy", add_special_tokens=False).input_ids)
    assert len(found) == 4 and [ids[i] for i in found] == pattern * 2  # both places ("The" lower-cased too)
    assert W.find_sequence([1, 2, 1, 2, 1], [1, 2, 1]) == [0, 1, 2, 3, 4]  # overlapping occurrences
    with pytest.raises(W.WordsError) as err:
        W.word_token_indices(tokenizer, prompt, "the cat", 32, who="person 2")
    assert "person 2" in str(err.value) and "'the cat'" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(W.WordsError, match="past its first 3 T5 tokens"):
        W.word_token_indices(tokenizer, prompt, "girl", 3)


def test_people_entries_with_words():
    assert W.person_words(("a.jpg", "the boy")) == ("a.jpg", "the boy")
    assert W.person_words(("a.jpg", "b.jpg")) == (("a.jpg", "b.jpg"), None)  # two photos of one person
    assert W.person_words("a.jpg") == ("a.jpg", None)
    index, weight, bound, top = W.word_table([[3, 4], None, [[7], [9, 10]]], 3)
    assert bound == (True, False, True) and top == 10 and index.shape == (2, 6)
    assert torch.allclose(weight.sum(-1), torch.tensor([[1.0, 0.0, 1.0], [1.0, 0.0, 1.0]]))
    with pytest.raises(W.WordsError, match="2 word entries for 3"):
        W.word_table([[1], None], 3)


# ----------------------------------------------------------------------------- the attention maps


def _attention(heads: int = 2, dim_head: int = 16):
    from diffusers.models.transformers.transformer_flux import FluxAttention

    torch.manual_seed(0)
    return FluxAttention(query_dim=heads * dim_head, heads=heads, dim_head=dim_head, added_kv_proj_dim=heads * dim_head,
                         bias=True, out_bias=True, eps=1e-6).eval()


@torch.no_grad()
def test_word_maps_equal_the_joint_attention_restricted_to_the_words():
    """The maps are FLUX's own q.k (norms and RoPE as its processor applies them), computed for a few keys."""
    from diffusers.models.embeddings import FluxPosEmbed, apply_rotary_emb

    attn = _attention()
    g = torch.Generator().manual_seed(1)
    batch, n_text, rows, cols = 2, 6, 3, 4
    image = torch.randn(batch, rows * cols, 32, generator=g)
    text = torch.randn(batch, n_text, 32, generator=g)
    img_ids = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"), -1).reshape(-1, 2)
    ids = torch.cat([torch.zeros(n_text, 3), torch.cat([torch.zeros(rows * cols, 1), img_ids.float()], 1)])
    ids[:n_text, 1] = torch.arange(n_text).float()  # non-trivial text positions, so RoPE matters
    rotary = FluxPosEmbed(theta=10000, axes_dim=[4, 6, 6])(ids)
    index, weight, _, _ = W.word_table([[1, 2], [4]], 2)
    got = W.word_maps(attn, image, text, rotary, index.expand(batch, -1), weight.expand(batch, -1, -1))
    q = attn.norm_q(attn.to_q(image).unflatten(-1, (2, 16)))
    k = attn.norm_added_k(attn.add_k_proj(text).unflatten(-1, (2, 16)))
    q = apply_rotary_emb(torch.cat([torch.zeros_like(k), q], 1), rotary, sequence_dim=1)[:, n_text:]
    k = apply_rotary_emb(torch.cat([k, torch.zeros_like(q)], 1), rotary, sequence_dim=1)[:, :n_text]
    probs = torch.softmax(torch.einsum("bnhd,bthd->bhtn", q, k) / math.sqrt(16), dim=-1).mean(1)  # [B, T, N]
    want = torch.stack([(probs[:, 1] + probs[:, 2]) / 2, probs[:, 4]])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert torch.allclose(got.sum(-1), torch.ones(2, batch))


def _constructed(places: list[list[torch.Tensor]], n_text: int = 12):
    """A FLUX attention whose image queries match text token ``2 + k`` exactly on ``places[k]``.

    Projections are the identity and the norms unit RMS norms, so q.k/sqrt(d) is sqrt(d) where an
    image token carries the direction of text token ``2 + k`` and about 0 elsewhere.
    """
    attn = _attention()
    with torch.no_grad():
        for lin in (attn.to_q, attn.add_k_proj):
            lin.weight.copy_(torch.eye(32))
            lin.bias.zero_()
    g = torch.Generator().manual_seed(2)
    directions = torch.linalg.qr(torch.randn(32, 32, generator=g))[0].T * 4  # orthogonal rows
    text = directions[:n_text].clone()[None]
    image = 0.05 * torch.randn(1, ROWS * COLS, 32, generator=g)
    for k, regions in enumerate(places):
        for j, region in enumerate(regions):
            token = 2 + k + 6 * j  # the person's j-th occurrence of their words
            image[0] += region[:, None] * directions[token][None]
    return attn, image, text


@pytest.mark.parametrize("count", [2, 3, 4])
@torch.no_grad()
def test_constructed_attention_gives_each_bound_person_the_territory_of_their_words(count):
    places = _quadrants()[:count]
    attn, image, text = _constructed([[p] for p in places])
    index, weight, bound, _ = W.word_table([[2 + k] for k in range(count)], count)
    maps = W.word_maps(attn, image, text, None, index, weight)  # [K, 1, N]
    base = build_layout(count, ROWS, COLS, 0.3, None, "cpu")
    layout = bind_words(base, maps, bound, ROWS, COLS, 0.3)
    owner = _owner(layout.territories)
    for k, place in enumerate(places):
        inside = place > 0.99
        assert bool((owner[inside] == k).all()), (k, owner.reshape(ROWS, COLS))
        mine = layout.territories[k, 0][inside]
        assert float(mine.mean()) > 0.9 and float(mine.min()) > 0.5  # full where their words look (soft borders)
        assert int(layout.priors[k, 0].argmax()) in set(torch.nonzero(inside).flatten().tolist())
    # The strip rule would have put person 1 on the left; their words put them top right.
    strips = build_layout(count, ROWS, COLS, 0.3, None, "cpu").territories
    assert not bool((_owner(strips)[places[0] > 0.99] == 0).all())


@torch.no_grad()
def test_words_twice_cover_both_places_and_unbound_people_share_the_rest():
    left, right = multi.box_region((0, 0, 0.25, 1), ROWS, COLS).reshape(-1), multi.box_region((0.75, 0, 1, 1), ROWS, COLS).reshape(-1)
    middle = multi.box_region((0.375, 0.25, 0.625, 0.75), ROWS, COLS).reshape(-1)
    attn, image, text = _constructed([[left, right], [middle]])
    # person 1's words occur twice (tokens 2 and 8), person 2 once (token 3), person 3 has no words
    index, weight, bound, _ = W.word_table([[2, 8], [3], None], 3)
    maps = W.word_maps(attn, image, text, None, index, weight)
    layout = bind_words(build_layout(3, ROWS, COLS, 0.3, None, "cpu"), maps, bound, ROWS, COLS, 0.3)
    owner = _owner(layout.territories)
    assert bool((owner[left > 0.99] == 0).all()) and bool((owner[right > 0.99] == 0).all())
    assert bool((owner[middle > 0.99] == 1).all())
    rest = (left + right + middle) < 0.01
    assert bool((owner[rest] == 2).any()) and float(layout.territories[2, 0][middle > 0.99].max()) < 0.05
    assert float(layout.territories.sum(0).max()) <= 1.0 + 1e-5  # the shares never exceed one in total


def test_before_any_map_the_strip_rule_holds():
    base = build_layout(2, ROWS, COLS, 0.3, None, "cpu")
    layout = bind_words(base, torch.zeros(2, 3, ROWS * COLS), (True, False), ROWS, COLS, 0.3)
    assert torch.equal(layout.priors, base.priors.expand(2, 3, -1))
    assert torch.equal(layout.territories, base.territories.expand(2, 3, -1))
    single = bind_words(build_layout(1, ROWS, COLS, 0.3, None, "cpu"), torch.zeros(1, 1, ROWS * COLS), (True,), ROWS, COLS, 0.3)
    assert isinstance(single, Layout) and torch.equal(single.territories, torch.ones(1, 1, ROWS * COLS))


# ----------------------------------------------------------------------------- the pipeline, synthetic maps


def _synthetic(monkeypatch, regions: dict[int, torch.Tensor]):
    """Replace FLUX's attention maps by known ones: text token ``i`` looks exactly at ``regions[i]``."""
    calls = []

    def fake(attn, image, text, rotary, index, weight):
        table = torch.stack([regions.get(i, torch.zeros(image.shape[1])) for i in range(text.shape[1])])
        table = table / table.sum(-1, keepdim=True).clamp_min(1e-12)
        looks = table[index]  # [B, K*T, N]
        count, width = weight.shape[1:]
        calls.append(1)
        return (looks.reshape(image.shape[0], count, width, -1) * weight[..., None]).sum(2).transpose(0, 1)

    monkeypatch.setattr(W, "word_maps", fake)
    return calls


def _dilated(place: torch.Tensor) -> torch.Tensor:
    grid = (place > 0.5).float().reshape(1, 1, ROWS, COLS)
    return torch.nn.functional.max_pool2d(grid, 3, stride=1, padding=1).reshape(-1)


def _run(pipe, **kw):
    args = {"height": ROWS * 16, "width": COLS * 16, "num_inference_steps": STEPS, "seed": 3, "output_type": "np",
            "preset": "paper", "return_masks": True}
    prompt = kw.pop("prompt", PROMPT)
    args.update(kw)
    return pipe(prompt, **args)


@pytest.mark.parametrize("count", [2, 3, 4])
def test_pipeline_places_bound_people_where_their_words_attention_is(tiny_pipe_plain, ids, tokenizer, monkeypatch, count):
    places = _quadrants()[:count]
    positions = [W.word_token_indices(tokenizer, PROMPT, w, 32) for w in WORDS[:count]]
    calls = _synthetic(monkeypatch, {p[0]: places[k] for k, p in enumerate(positions)})
    people = [(ids[0][k], WORDS[k]) for k in range(count)]
    out = _run(tiny_pipe_plain, people=people)
    assert calls and out.settings["identity"]["people"][0]["words"] == "boy"
    layout_steps = [m.step for m in out.masks if m.phase == "prior"]
    assert len(layout_steps) >= 2
    for step_masks in out.masks:
        per_person = step_masks.people[:, :, 0].reshape(-1, count, ROWS * COLS)  # [points, K, N]
        if step_masks.step == 0:
            continue  # no map yet: the strip rule
        for k, place in enumerate(places):
            near = _dilated(place)  # the place and the one-token soft border the smoothing gives it
            mass = per_person[:, k].sum(-1)
            share = float(((per_person[:, k] * near).sum(-1) / mass.clamp_min(1e-12)).min())
            assert share > 0.95, (count, step_masks.step, step_masks.phase, k, share)
            core = float((per_person[:, k] * (place > 0.5)).sum(-1).div(mass.clamp_min(1e-12)).mean())
            assert core > 0.6, (count, step_masks.step, k, core)


def test_words_twice_in_the_pipeline_use_both_places(tiny_pipe_plain, ids, tokenizer, monkeypatch):
    prompt = "the boy and the girl and the boy"
    boy = W.word_token_indices(tokenizer, prompt, "boy", 32)
    girl = W.word_token_indices(tokenizer, prompt, "girl", 32)
    left = multi.box_region((0, 0, 0.25, 1), ROWS, COLS).reshape(-1)
    right = multi.box_region((0.75, 0, 1, 1), ROWS, COLS).reshape(-1)
    middle = multi.box_region((0.375, 0, 0.625, 1), ROWS, COLS).reshape(-1)
    assert len(boy) == 2
    _synthetic(monkeypatch, {boy[0]: left, boy[1]: right, girl[0]: middle})
    out = _run(tiny_pipe_plain, prompt=prompt, people=[(ids[0][0], "boy"), (ids[0][1], "girl")])
    last = out.masks[-1].people[:, 0, 0].sum(0).reshape(-1)  # person 1, summed over points
    assert float(last[left > 0.5].sum()) > 0.2 * float(last.sum()) and float(last[right > 0.5].sum()) > 0.2 * float(last.sum())
    assert float(last[middle > 0.5].sum()) < 0.1 * float(last.sum())


def test_words_absent_is_one_line_error_before_any_step(tiny_pipe_plain, ids):
    from spatialid.errors import SpatialIDError

    injector = tiny_pipe_plain.injector
    before = injector.calls
    with pytest.raises(SpatialIDError) as err:
        _run(tiny_pipe_plain, people=[(ids[0][0], "boy"), (ids[0][1], "the cat")])
    text = str(err.value)
    assert "person 2" in text and "'the cat'" in text and "\n" not in text
    assert injector.calls == before  # refused before the denoising loop
    with pytest.raises(SpatialIDError, match="regions or words"):
        _run(tiny_pipe_plain, people=[(ids[0][0], "boy"), ids[0][1]], regions=["0,0,0.5,1", "0.5,0,1,1"])


def test_record_and_replay_bit_for_bit_with_true_cfg(tiny_pipe_plain, ids, tmp_path):
    from safetensors import safe_open

    people = [(ids[0][0], "boy"), (ids[0][1], "the girl"), ids[0][2]]
    kw = dict(people=people, uncond_id_embeds=ids[1], true_cfg=2.0, return_masks=False)
    path = tmp_path / "words.safetensors"
    first = _run(tiny_pipe_plain, save_masks=path, **kw)
    with safe_open(str(path), framework="pt") as f:
        maps = f.get_tensor("layout_maps")
        meta = f.metadata()
    assert tuple(maps.shape) == (STEPS, 3, 1, ROWS, COLS) and meta["words"] == '["boy", "the girl", null]'
    assert float(maps[0].abs().sum()) == 0 and float(maps[1, 0].sum()) > 0 and float(maps[1, 2].sum()) == 0
    again = _run(tiny_pipe_plain, masks_from=path, **kw)
    assert np.array_equal(first.images, again.images)
    broken = tmp_path / "broken.safetensors"
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    tensors["layout_maps"] = tensors["layout_maps"][:, :2].contiguous()
    save_file(tensors, str(broken), metadata=meta)
    from spatialid.errors import SpatialIDError

    with pytest.raises(SpatialIDError, match="layout_maps"):
        _run(tiny_pipe_plain, masks_from=broken, **kw)


def test_people_without_words_are_unchanged(tiny_pipe_plain, ids):
    """The words hooks pass through for unbound people: removing them changes no bit."""
    from diffusers.hooks.hooks import HookRegistry

    from spatialid.injection.hooks import WORDS_HOOK, WordsHook, register_innermost

    people = [ids[0][0], ids[0][1]]
    with_hooks = _run(tiny_pipe_plain, people=people)
    injector = tiny_pipe_plain.injector
    assert injector._word_attns
    for attn in injector._word_attns:
        HookRegistry.check_if_exists_or_initialize(attn).remove_hook(WORDS_HOOK, recurse=False)
    try:
        without = _run(tiny_pipe_plain, people=people)
    finally:
        for attn in injector._word_attns:
            register_innermost(attn, WordsHook(injector), WORDS_HOOK)
    assert np.array_equal(with_hooks.images, without.images)
    assert all(torch.equal(a.people, b.people) for a, b in zip(with_hooks.masks, without.masks))
    bound = _run(tiny_pipe_plain, people=[(ids[0][0], "boy"), ids[0][1]])
    assert not np.array_equal(bound.images, with_hooks.images)  # words do change the layout


def test_one_bound_person_and_prompt_lists(tiny_pipe_plain, ids):
    out = _run(tiny_pipe_plain, people=[(ids[0][0], "the girl")])
    assert out.settings["identity"]["people"][0]["words"] == "the girl"
    centre = _run(tiny_pipe_plain, people=[ids[0][0]])
    assert torch.equal(out.masks[0].masks, centre.masks[0].masks)  # step 0: the centre prior, no map yet
    assert not torch.equal(out.masks[1].masks, centre.masks[1].masks)  # then the words' map
    two = _run(tiny_pipe_plain, prompt=["the boy smiling", "a photo of the boy"], people=[(ids[0][0], "boy")],
               num_images_per_prompt=2)
    assert len(two.images) == 4


# ----------------------------------------------------------------------------- compiled, CLI


@torch.no_grad()
def test_word_capture_traces_fullgraph_without_recompiles():
    import torch._dynamo
    from diffusers import FluxTransformer2DModel

    from spatialid.injection import IdentityInjector
    from spatialid.masks import SpatialSchedule
    from spatialid.models import PerceiverAttentionCA
    from spatialid.models.configs import TINY_FLUX, TINY_PULID

    torch._dynamo.reset()
    torch.manual_seed(0)
    cfg = TINY_FLUX
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=cfg.latent_channels * 4, num_layers=2, num_single_layers=1,
        attention_head_dim=cfg.attention_head_dim, num_attention_heads=cfg.num_attention_heads,
        joint_attention_dim=cfg.joint_attention_dim, pooled_projection_dim=cfg.pooled_projection_dim,
        guidance_embeds=True, axes_dims_rope=cfg.axes_dims_rope,
    ).eval()
    cas = torch.nn.ModuleList(PerceiverAttentionCA.from_config(TINY_PULID.ca) for _ in range(2)).eval()
    injector = IdentityInjector(model, cas)
    g = torch.Generator().manual_seed(2)
    rows, cols, n_text = 3, 4, 5
    img_ids = torch.zeros(rows * cols, 3)
    img_ids[:, 1] = torch.arange(rows).repeat_interleave(cols).float()
    img_ids[:, 2] = torch.arange(cols).repeat(rows).float()
    base = dict(
        hidden_states=torch.randn(2, rows * cols, cfg.latent_channels * 4, generator=g),
        encoder_hidden_states=torch.randn(2, n_text, cfg.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(2, cfg.pooled_projection_dim, generator=g),
        img_ids=img_ids, txt_ids=torch.zeros(n_text, 3), guidance=torch.full((2,), 3.5), return_dict=False,
    )
    people = [torch.randn(1, 4, TINY_PULID.ca.kv_dim, generator=g) for _ in range(2)]
    compiled = torch.compile(model, backend="eager", fullgraph=True)

    def steps(fn):
        outs = []
        with injector.active(people, 1.0, SpatialSchedule(), grid=(rows, cols), word_tokens=[[1], [3, 4]]) as s:
            for t in (0.95, 0.9, 0.8, 0.5):
                outs.append(fn(**base, timestep=torch.full((2,), t))[0])
            maps = s.identity._word_state["acc"].clone()
        return outs, maps

    try:
        eager, eager_maps = steps(model)
        traced, traced_maps = steps(compiled)
        with torch._dynamo.config.patch(error_on_recompile=True):
            again, _ = steps(compiled)
        for a, b, c in zip(eager, traced, again):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(traced_maps, eager_maps)
        # 3 layout steps (t > 0.7) x 2 blocks, each map a distribution over the image tokens
        assert torch.allclose(eager_maps.sum(-1), torch.full((2, 2), 6.0))
    finally:
        injector.detach()
        torch._dynamo.reset()


def _cli(argv, capsys):
    from spatialid.cli.main import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_person_at_words_replay_and_errors(tmp_path, photo_dir, astronaut, capsys):
    from PIL import Image

    from spatialid.app.metadata import read_image_metadata

    second = tmp_path / "mirror.png"
    Image.open(astronaut).transpose(Image.FLIP_LEFT_RIGHT).save(second)
    fast = ["--model", "tiny", "--size", "96x64", "--steps", "4", "--seed", "4", "-p", "the boy and the girl"]
    people = ["--person", f"{astronaut}@the boy", "--person", f"{second}@girl"]
    out, masks = tmp_path / "words.png", tmp_path / "words.safetensors"
    code, _, err = _cli(["generate", *fast, *people, "--save-masks", masks, "-o", out], capsys)
    assert code == 0, err
    meta = read_image_metadata(out)
    assert [p.get("words") for p in meta["identity"]["people"]] == ["the boy", "girl"]
    code, stdout, _ = _cli(["info", out], capsys)
    assert code == 0 and "bound to 'the boy'" in stdout and "girl" in stdout
    again = tmp_path / "again.png"
    code, _, err = _cli(["generate", *fast, *people, "--masks-from", masks, "-o", again], capsys)
    assert code == 0, err
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again)))
    restored = tmp_path / "restored.png"  # --from-png binds the people to their words again
    code, _, err = _cli(["generate", "--from-png", out, "--model", "tiny", "-o", restored], capsys)
    assert code == 0, err
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(restored)))
    code, _, err = _cli(["generate", *fast, "--person", f"{astronaut}@the cat", "-o", tmp_path / "x.png"], capsys)
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("spatialid: error:")]
    assert code == 2 and len(lines) == 1 and "the cat" in lines[0] and "Traceback" not in err
    assert not (tmp_path / "x.png").exists()


def test_occurrence_picks_one_place_of_repeated_words(tokenizer):
    prompt = "a man and another man"
    both = W.word_token_indices(tokenizer, prompt, "man", 32)
    second = W.word_token_indices(tokenizer, prompt, "man#2", 32)
    assert len(both) == 2 and second == [both[1]] and W.word_token_indices(tokenizer, prompt, "man#1", 32) == [both[0]]
    assert W.person_words(("a.jpg", "man", 2)) == ("a.jpg", "man#2")
    with pytest.raises(W.WordsError, match="occurrence 3 of the words 'man'"):
        W.word_token_indices(tokenizer, prompt, "man#3", 32, who="person 1")


# ----------------------------------------------------------------------------- front-ends: web UI, bench


def test_web_ui_region_field_takes_words(photo_dir):
    from spatialid.ui import people as P
    from spatialid.ui.inputs import UIInputError

    assert P.parse_place("the boy", 1) == (None, "the boy") and P.parse_place("0,0,0.5,1", 1) == ((0.0, 0.0, 0.5, 1.0), None)
    assert P.parse_place("1e-1,0,1,1", 1)[0] == (0.1, 0.0, 1.0, 1.0) and P.parse_place("", 2) == (None, None)
    mirrored = str(photo_dir / "mirrored.png")
    inputs = P.build_inputs([photo_dir / "astronaut.png"], first_region="the girl", people_count=2, others=[([mirrored], "")])
    assert inputs.words == ("the girl", None) and inputs.regions is None

    class Cache:
        def get_or_encode(self, pipe, photos):
            return f"emb:{Path(photos[0]).name}"

    assert P.identity_for(None, [photo_dir / "astronaut.png"], inputs, Cache()) == [("emb:astronaut.png", "the girl"), "emb:mirrored.png"]
    one = P.build_inputs([photo_dir / "astronaut.png"], first_region="@the boy")
    assert P.identity_for(None, [photo_dir / "astronaut.png"], one, Cache()) == [("emb:astronaut.png", "the boy")]
    with pytest.raises(UIInputError, match="not both"):
        P.build_inputs([photo_dir / "astronaut.png"], first_region="0,0,0.5,1", people_count=2, others=[([mirrored], "the girl")])
    values, _ = P.restore_inputs({"people": [["a.png"], ["b.png"]], "identity": {"people": [{"words": "the boy"}, {}]}})
    assert values["regions"][:2] == ["the boy", ""]
    assert "bound to words" in P.active_modes(people_count=2, regions=["the boy", ""]).people_header


def test_bench_binds_xversebench_words_to_people():
    from types import SimpleNamespace

    from spatialid.bench.generators import PipelineGenerator

    seen = {}

    def pipe(**kwargs):
        seen.update(kwargs)
        return SimpleNamespace(images=["image"])

    item = SimpleNamespace(people_words=(("man", 1), None, ("man", 2)), is_baseline=False,
                           identity=SimpleNamespace(regions=(None, None, None), is_group=True))
    fake = SimpleNamespace(pipe=pipe, masks_path=lambda item: None)
    assert PipelineGenerator._generate(fake, item, ["a", "b", "c"], {"prompt": "a man, a dog and another man"}) == "image"
    assert seen["people"] == [("a", "man#1"), "b", ("c", "man#2")]
    single = SimpleNamespace(people_words=(("woman", 1),), is_baseline=False, identity=SimpleNamespace(regions=(None,), is_group=False))
    PipelineGenerator._generate(fake, single, "e", {"prompt": "a woman"})
    assert seen["people"] == [("e", "woman#1")]
