"""People bound to words of the prompt: which text tokens, and where FLUX's attention puts them.

``people=[(photo, "the boy"), (photo, "the woman")]`` (CLI ``--person PHOTO@WORDS``) binds each
person to words of the prompt. FLUX's text tokens are the T5 tokens of the prompt (FluxPipeline
pads them to ``max_sequence_length``), so :func:`word_token_indices` tokenizes the prompt with
the pipeline's ``tokenizer_2`` and finds every occurrence of the words' token sub-sequence
(words that occur twice use both places, unless ``"man#2"`` picks the second; words not in the
prompt, or cut off by the T5 length, are a one-line :class:`WordsError`).

During the layout steps (``t > early`` of the schedule, the steps whose masks are the priors),
a hook on the attention of one or two middle double-stream blocks (:func:`word_blocks`) reads
the attention's own inputs and computes, for those few text tokens only (never the full
attention map):

    q = RoPE(norm_q(W_q h_img)),  k = RoPE(norm_added_k(W_added_k h_words))
    map_k = mean over heads and person k's word tokens of softmax_over_image(q . k / sqrt(d))

accumulated into a preallocated ``[K, B, N]`` tensor on the positive (cond) branch. The layout
of each later step comes from those maps (:func:`spatialid.masks.compute.bind_words`). Tensor
code with static shapes only: the capture traces under ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from spatialid.errors import SpatialIDError

__all__ = [
    "WordsError",
    "call_layout",
    "find_sequence",
    "person_words",
    "split_occurrence",
    "layout_replay_table",
    "readable_attention",
    "word_blocks",
    "word_maps",
    "word_table",
    "word_token_indices",
]


class WordsError(SpatialIDError, ValueError):
    """A person's words cannot be found among the prompt's T5 tokens, or word tokens are malformed
    (a ``ValueError`` as :class:`~spatialid.injection.identity.IdentityError`; one line in the CLI)."""


_PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".safetensors")


def person_words(entry: Any) -> tuple[Any, str | None]:
    """One ``people`` entry -> ``(the person, their words or None)``.

    ``(photo, "the boy")`` binds a person to words: a tuple of two whose second item is a string
    that is neither an existing file nor a picture/identity file name (``("a.jpg", "b.jpg")``
    stays two photos of one person).
    """
    if isinstance(entry, tuple) and len(entry) == 3 and isinstance(entry[1], str) and _is_index(entry[2]) and entry[2] >= 1:
        return entry[0], f"{entry[1]}#{entry[2]}"  # (photo, "man", 2): the second "man" of the prompt
    if isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[1], str):
        import os

        words = entry[1]
        if not os.path.exists(words) and not words.strip().lower().endswith(_PICTURE_SUFFIXES):
            return entry[0], words
    return entry, None


def find_sequence(tokens: Sequence[int], pattern: Sequence[int], occurrence: int | None = None) -> list[int]:
    """Every position covered by an occurrence of ``pattern`` in ``tokens`` (all occurrences, in
    order), or by its ``occurrence``-th one only (1-based; [] when there are fewer)."""
    n, m = len(tokens), len(pattern)
    starts = [s for s in (range(n - m + 1) if m else ()) if list(tokens[s : s + m]) == list(pattern)]
    if occurrence is not None:
        starts = starts[occurrence - 1 : occurrence]
    return sorted({i for s in starts for i in range(s, s + m)})


def split_occurrence(words: str) -> tuple[str, int | None]:
    """``"man#2"`` -> ``("man", 2)`` (the second "man" of the prompt); ``"the boy"`` -> ``("the boy", None)``."""
    head, sep, tail = str(words).rpartition("#")
    if sep and head.strip() and tail.strip().isdigit() and int(tail) >= 1:
        return head.strip(), int(tail)
    return str(words).strip(), None


def _ids(tokenizer: Any, text: str, **kwargs: Any) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False, **kwargs).input_ids)


def word_token_indices(tokenizer: Any, prompt: str, words: str, max_len: int, who: str = "a person") -> list[int]:
    """The positions of ``words`` among ``prompt``'s T5 tokens (FLUX's text tokens), all occurrences.

    Tried as written and lower-cased (T5's tokens are case-sensitive). Raises :class:`WordsError`
    (one line, naming ``who`` and the words) when they are not in the first ``max_len`` tokens.
    """
    text, occurrence = split_occurrence(words)
    if not text:
        raise WordsError(f"{who}: empty words; give words of the prompt, e.g. PHOTO@'the boy'")
    # as FluxPipeline tokenizes it (special tokens included), so positions are the text tokens'
    tokens = list(tokenizer(prompt, truncation=True, max_length=max_len).input_ids)
    for variant in dict.fromkeys((text, text.lower())):
        pattern = _ids(tokenizer, variant)
        found = find_sequence(tokens, pattern, occurrence)
        if found:
            return found
    which = f"occurrence {occurrence} of " if occurrence else ""
    raise WordsError(
        f"{who}: {which}the words {text!r} {'is' if occurrence else 'are'} not in the prompt{_cut(tokenizer, prompt, max_len)}; give words that occur "
        f"in the prompt (e.g. --person PHOTO@'the boy' with a prompt that says 'the boy')"
    )


def _cut(tokenizer: Any, prompt: str, max_len: int) -> str:
    total = len(_ids(tokenizer, prompt))
    return f" (or are past its first {max_len} T5 tokens)" if total > max_len else ""


def word_table(
    people_tokens: Sequence[Any], count: int
) -> tuple[torch.Tensor, torch.Tensor, tuple[bool, ...], int]:
    """Each person's word tokens as ``(index [P, K*T] int64, weight [P, K, T] float32, bound, max index)``.

    ``people_tokens[k]`` is None (no words) or the token positions of person k: one list for
    every prompt, or one list per prompt (P prompts). ``weight`` is ``1 / tokens`` on a person's
    tokens and 0 on padding, so the weighted sum is the mean over the person's tokens.
    """
    if len(people_tokens) != count:
        raise WordsError(f"{len(people_tokens)} word entries for {count} person(s); give one per person (None: no words)")
    per_person: list[list[list[int]] | None] = []
    prompts = 1
    for k, entry in enumerate(people_tokens):
        if entry is None:
            per_person.append(None)
            continue
        lists = [list(entry)] if all(_is_index(v) for v in entry) else [list(e) for e in entry]
        if not lists or any(not lst or not all(_is_index(v) for v in lst) for lst in lists):
            raise WordsError(f"person {k + 1}: word tokens must be text-token positions (whole numbers >= 0), got {entry!r}")
        per_person.append(lists)
        if len(lists) > 1:
            if prompts not in (1, len(lists)):
                raise WordsError("every bound person needs word tokens for the same number of prompts")
            prompts = len(lists)
    bound = tuple(p is not None for p in per_person)
    if not any(bound):
        raise WordsError("word_tokens names no words for anybody; give None instead")
    width = max(len(lst) for p in per_person if p is not None for lst in p)
    index = torch.zeros(prompts, count, width, dtype=torch.int64)
    weight = torch.zeros(prompts, count, width, dtype=torch.float32)
    for k, lists in enumerate(per_person):
        for prompt in range(prompts):
            if lists is None:
                continue
            chosen = lists[prompt if len(lists) > 1 else 0]
            index[prompt, k, : len(chosen)] = torch.tensor(chosen, dtype=torch.int64)
            weight[prompt, k, : len(chosen)] = 1.0 / len(chosen)
    return index.reshape(prompts, count * width), weight, bound, int(index.max())


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def word_blocks(num_double: int) -> list[int]:
    """The double-stream blocks whose attention gives the word maps: the middle one or two."""
    if num_double < 1:
        return []
    return sorted({max(num_double // 2 - 1, 0), num_double // 2})


def readable_attention(attn: Any) -> bool:
    """Whether ``attn`` is a FLUX joint attention whose image queries and text keys can be recomputed."""
    has_q = hasattr(attn, "to_q") or hasattr(attn, "to_qkv")
    has_k = hasattr(attn, "add_k_proj") or hasattr(attn, "to_added_qkv")
    return has_q and has_k and all(hasattr(attn, n) for n in ("norm_q", "norm_added_k", "head_dim"))


def _projection(attn: Any, which: str, x: torch.Tensor) -> torch.Tensor:
    """``attn``'s query (``"q"``) or added-key (``"k"``) projection of ``x``, fused projections too."""
    if which == "q":
        if getattr(attn, "fused_projections", False) and hasattr(attn, "to_qkv"):
            return _slice_linear(attn.to_qkv, 0, x)
        return attn.to_q(x)
    if getattr(attn, "fused_projections", False) and hasattr(attn, "to_added_qkv"):
        return _slice_linear(attn.to_added_qkv, 1, x)
    return attn.add_k_proj(x)


def _slice_linear(linear: Any, part: int, x: torch.Tensor) -> torch.Tensor:
    rows = linear.weight.shape[0] // 3
    bias = linear.bias[part * rows : (part + 1) * rows] if linear.bias is not None else None
    return F.linear(x, linear.weight[part * rows : (part + 1) * rows], bias)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """FLUX's rotary embedding (diffusers' ``apply_rotary_emb``, real pairs) with ``cos``/``sin``
    ``[B|1, L, d]`` per token, for ``x`` ``[B, L, heads, d]``."""
    real, imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    rotated = torch.stack([-imag, real], dim=-1).flatten(3)
    return (x.float() * cos[:, :, None, :] + rotated.float() * sin[:, :, None, :]).to(x.dtype)


def word_maps(
    attn: Any,
    image: torch.Tensor,
    text: torch.Tensor,
    rotary: Any,
    index: torch.Tensor,
    weight: torch.Tensor,
) -> torch.Tensor:
    """Each person's attention map over the image tokens ``[K, B, N]`` (float32, each sums to 1 or 0).

    Args:
        attn: the block's joint attention (diffusers ``FluxAttention``).
        image: the image tokens entering it ``[B, N, C]`` (the generated ones).
        text: the text tokens entering it ``[B, S, C]``.
        rotary: the ``(cos, sin)`` ``[S + N_all, d]`` it receives (text first), or None.
        index: the chosen text tokens ``[B, K*T]``; weight: ``[B, K, T]`` (mean over a person's tokens).
    """
    batch, n_img = image.shape[:2]
    count, width = weight.shape[1], weight.shape[2]
    d = int(attn.head_dim)
    chosen = torch.gather(text, 1, index[:, :, None].expand(-1, -1, text.shape[-1]))  # [B, K*T, C]
    q = attn.norm_q(_projection(attn, "q", image).unflatten(-1, (-1, d)))
    k = attn.norm_added_k(_projection(attn, "k", chosen).unflatten(-1, (-1, d)))
    if rotary is not None:
        cos, sin = rotary
        n_text = text.shape[1]
        q = _rope(q, cos[None, n_text : n_text + n_img].to(q.device), sin[None, n_text : n_text + n_img].to(q.device))
        k = _rope(k, cos.to(k.device)[index], sin.to(k.device)[index])
    scores = torch.einsum("bnhd,bthd->bhtn", q.float(), k.float()) / math.sqrt(d)
    probs = torch.softmax(scores, dim=-1).mean(dim=1)  # [B, K*T, N]: where each word token looks
    maps = (probs.reshape(batch, count, width, n_img) * weight[..., None].to(probs.device)).sum(dim=2)
    return maps.transpose(0, 1)  # [K, B, N]


def _batch_rows(table: torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    """Per-prompt rows ``[P, ...]`` for a call of ``batch`` samples (FluxPipeline repeats each
    prompt ``num_images_per_prompt`` times in a row)."""
    prompts = table.shape[0]
    if prompts == 1:
        return table.to(device).expand(batch, *table.shape[1:])
    if batch % prompts:
        raise WordsError(f"word tokens for {prompts} prompts but the transformer batch is {batch}")
    return table.to(device).repeat_interleave(batch // prompts, dim=0)


def call_layout(ident: Any, call: Any, layout: Any, batch: int, rows: int, cols: int, sigma: float, t: Any,
                device: torch.device, injecting: bool) -> tuple[Any, tuple[Any, ...] | None]:
    """This call's :class:`~spatialid.masks.compute.Layout` for an identity with people bound to
    words, and what the attention hook accumulates (``(index, weight, gate, maps)`` or None).

    The layout comes from the maps accumulated before this step (a snapshot taken on the
    positive branch, so both CFG branches of a step use the same one) or, replaying a mask file,
    from its recorded maps. The positive branch accumulates while ``t > early`` (the layout
    steps), on preallocated tensors (no host reads).
    """
    from spatialid.masks.compute import bind_words
    from spatialid.masks.multi import WORD_LAYOUT_UNTIL

    count, n = ident.count, rows * cols
    state = ident._word_state
    acc = state.get("acc")
    if acc is None or tuple(acc.shape) != (count, batch, n) or acc.device != device:
        state["acc"] = torch.zeros(count, batch, n, dtype=torch.float32, device=device)
        state["source"] = torch.zeros_like(state["acc"])
        index, weight, _, _ = ident._words
        state["index"] = _batch_rows(index, batch, device)
        state["weight"] = _batch_rows(weight, batch, device)
    cond = call.branch != "uncond"
    capture = None
    if ident._replay_maps is not None:
        table = ident._replay_maps
        if call.step >= table.shape[0] or tuple(table.shape[1:]) != (count, batch, n):
            from spatialid.injection.people import MaskFileError

            raise MaskFileError(
                f"the mask file's word maps {tuple(table.shape[1:])} have no entry for step {call.step} of "
                f"[persons, batch, tokens] = {(count, batch, n)}; use the same people, size, steps and number of images"
            )
        source = table[call.step].to(device)
    else:
        source = state["source"]
        if cond:
            if call.step == 0:
                state["acc"].zero_()  # a new denoising run with the same identity object
            source.copy_(state["acc"])
            until = ident.schedule.early if ident.schedule is not None else WORD_LAYOUT_UNTIL
            gate = (t > until).float() if t is not None else torch.ones(batch, device=device)
            capture = (state["index"], state["weight"], gate.to(device), state["acc"])
    if ident.record_masks and injecting and cond and ident._record is not None:
        _record(state, ident._record[0].shape[0], call.step, source)
    return bind_words(layout, source, ident.bound, rows, cols, sigma), capture


def _record(state: dict[str, torch.Tensor], steps: int, step: int, source: torch.Tensor) -> None:
    """Keep ``source`` as step ``step``'s layout maps (buffers sized like the mask records)."""
    record = state.get("record")
    if record is None or record.shape[0] != steps or record.shape[1:] != source.shape:
        new = torch.zeros(steps, *source.shape, dtype=torch.float32, device=source.device)
        filled = torch.zeros(steps, dtype=torch.bool, device=source.device)
        if record is not None and record.shape[1:] == source.shape:
            keep = min(record.shape[0], steps)
            new[:keep], filled[:keep] = record[:keep], state["filled"][:keep]
        state["record"], state["filled"] = new, filled
    state["record"][step].copy_(source)
    state["filled"][step] = True


def layout_replay_table(path: Any) -> torch.Tensor | None:
    """A mask file's word maps as a replay table ``[last_step + 1, K, B, N]``, or None when it has none.

    Written by :func:`spatialid.injection.people.save_mask_file` as ``layout_maps`` float32
    ``[steps, persons, batch, rows, cols]`` beside ``masks`` (same steps).
    """
    from pathlib import Path

    from safetensors import SafetensorError, safe_open

    from spatialid.injection.people import MaskFileError, load_mask_file

    masks, meta = load_mask_file(path)
    p = Path(path).expanduser()
    try:
        with safe_open(str(p), framework="pt") as f:
            if "layout_maps" not in set(f.keys()):
                return None
            maps = f.get_tensor("layout_maps")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise MaskFileError(f"{p}: not a mask file written by --save-masks ({type(exc).__name__})") from None
    want = (masks.shape[0], *masks.shape[2:])
    if maps.dtype != torch.float32 or tuple(maps.shape) != want:
        raise MaskFileError(f"{p}: 'layout_maps' must be float32 {want} (steps, persons, batch, rows, cols), got {tuple(maps.shape)}")
    if not bool(torch.isfinite(maps).all()) or (maps.numel() and float(maps.min()) < 0):
        raise MaskFileError(f"{p}: layout maps must be finite and >= 0")
    steps = meta["steps"]
    table = torch.zeros(max([*steps, 0]) + 1, maps.shape[1], maps.shape[2], maps.shape[3] * maps.shape[4], dtype=torch.float32)
    for i, step in enumerate(steps):
        if step >= 0:
            table[step] = maps[i].reshape(table.shape[1:])
    return table
