"""The benchmark grid: deterministic items, stable keys, and the split across machines and GPUs.

An *item* is one image to make: (identity, prompt, seed, preset). Items are grouped in *units* of
(identity, prompt, seed): every preset of a unit is drawn from the same starting noise, so the
presets of one unit are the images to compare side by side, and the no-identity baseline of a unit
(preset ``"none"``) is the reference for its background-contamination measurement.

Splitting works on units, never on single items, so a unit's presets and its baseline always land
on the same machine and process: ``--shard K/N`` keeps units ``u`` with ``u % N == K - 1``;
inside a shard, ``accelerate launch`` processes take every ``P``-th of the shard's units by rank.
Units are numbered in input order (identity, then prompt, then seed), so the same inputs give the
same split on every machine; item keys never depend on the split, which is what lets ``merge``
join shard outputs into exactly the result of one run.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from spatialid.bench.datasets import BenchInputError, Identity, PromptSpec, parse_index_list

__all__ = [
    "BASELINE_PRESET",
    "BenchItem",
    "ProcessInfo",
    "ShardSpec",
    "build_grid",
    "parse_presets",
    "parse_seeds",
    "parse_shard",
    "process_split",
    "select_items",
]

BASELINE_PRESET = "none"  # the same seed and prompt generated without identity
_PRESET_NAME = re.compile(r"^[a-z0-9][a-z0-9_.+-]{0,63}$")


@dataclass(frozen=True)
class BenchItem:
    """One image of the grid. ``unit`` numbers its (identity, prompt, seed) group in input order."""

    unit: int
    identity: Identity
    prompt: PromptSpec
    seed: int
    preset: str

    @property
    def is_baseline(self) -> bool:
        return self.preset == BASELINE_PRESET

    @property
    def prompt_text(self) -> str:
        return self.prompt.render(self.identity.gender)

    @property
    def people_words(self) -> tuple[tuple[str, int] | None, ...]:
        """Per person (one for a single identity), the prompt words it is bound to and which
        occurrence of them, e.g. ``("man", 2)``; None for a person bound to no words (XVerseBench's
        ``use_words``; IBench and groups files bind none). Where people are built, these bind them."""
        people = self.identity.members or (self.identity,)
        return tuple((p.words, p.occurrence) if p.words is not None else None for p in people)

    @property
    def unit_key(self) -> str:
        """``<identity key>/p<prompt index>/s<seed>``: shared by the presets of one unit."""
        return f"{self.identity.key}/p{self.prompt.index:03d}/s{self.seed}"

    @property
    def key(self) -> str:
        """Stable identity of the item across runs, shards and merges."""
        return f"{self.unit_key}/{self.preset}"

    @property
    def image_name(self) -> str:
        """File name of the image inside its preset's ``images/`` folder."""
        return f"{self.identity.key}_p{self.prompt.index:03d}_s{self.seed}.png"

    @property
    def baseline_group(self) -> tuple[str, int]:
        """Baselines with the same rendered prompt and seed are the same image (no identity involved)."""
        return (self.prompt_text, self.seed)


def parse_presets(text: str | Sequence[str], known: Iterable[str] | None = None) -> list[str]:
    """``"pulid,paper"`` -> ``["pulid", "paper"]`` (lower-cased, ``_`` -> ``-``, duplicates dropped).

    ``known`` (the mask presets) is checked when given; ``"none"`` (no identity) is always allowed.
    """
    names = text.split(",") if isinstance(text, str) else list(text)
    out: list[str] = []
    for raw in names:
        name = raw.strip().lower().replace("_", "-")
        if not name:
            continue
        if not _PRESET_NAME.match(name):
            raise BenchInputError(f"preset name {raw!r} is not valid (letters, digits, '-', '.')")
        if known is not None and name != BASELINE_PRESET and name not in set(known):
            raise BenchInputError(f"unknown preset {raw!r}; choose from {', '.join(sorted(set(known)))} (or 'none')")
        if name not in out:
            out.append(name)
    if not out:
        raise BenchInputError("no preset given; e.g. --presets pulid,paper")
    return out


def parse_seeds(text: str | Sequence[int]) -> list[int]:
    """``"42,43"`` or ``"42-45"`` -> list of distinct non-negative seeds, in order."""
    items = parse_index_list(text, what="seeds", example="42,43 or 42-45")
    for v in items:
        if v >= 2**63:
            raise BenchInputError(f"seed must be between 0 and 2**63 - 1, got {v}")
    if not items:
        raise BenchInputError("no seed given; e.g. --seeds 42")
    return items


@dataclass(frozen=True)
class ShardSpec:
    """``--shard K/N``: this machine does the K-th of N parts (1-based)."""

    index: int = 1
    count: int = 1

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def owns(self, unit: int) -> bool:
        return unit % self.count == self.index - 1


def parse_shard(text: str | None) -> ShardSpec:
    """Parse ``"K/N"`` (1 <= K <= N); None or empty means the whole grid."""
    if text is None or not str(text).strip():
        return ShardSpec()
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not m:
        raise BenchInputError(f"--shard must look like K/N, e.g. 1/4, got {text!r}")
    k, n = int(m.group(1)), int(m.group(2))
    if n < 1 or not 1 <= k <= n:
        raise BenchInputError(f"--shard {text}: need 1 <= K <= N (K counts from 1), e.g. 1/{max(n, 2)}")
    return ShardSpec(k, n)


def build_grid(
    identities: Sequence[Identity],
    prompts: Sequence[PromptSpec],
    presets: Sequence[str],
    seeds: Sequence[int],
    *,
    baseline: bool = True,
) -> list[BenchItem]:
    """All items in input order: identity (or group of people), prompt, seed, then the baseline and the presets."""
    if not identities or not prompts or not presets or not seeds:
        raise BenchInputError("the grid is empty: need at least one identity, prompt, preset and seed")
    order = list(presets)
    if baseline and BASELINE_PRESET not in order:
        order.insert(0, BASELINE_PRESET)
    items: list[BenchItem] = []
    unit = 0
    for identity in identities:
        for prompt in prompts:
            if not identity.uses_prompt(prompt.index):  # a group limited to some prompts
                continue
            for seed in seeds:
                items.extend(BenchItem(unit, identity, prompt, int(seed), preset) for preset in order)
                unit += 1
    return items


@dataclass(frozen=True)
class ProcessInfo:
    """This process among the processes of one machine (``accelerate launch`` / ``torchrun``)."""

    index: int = 0
    count: int = 1
    device: str | None = None  # the accelerator this process should use (None: choose as usual)
    synchronized: bool = False  # True when a barrier across the processes is available

    def wait_for_everyone(self) -> None:
        if self.synchronized:
            from accelerate import PartialState

            PartialState().wait_for_everyone()


def process_split() -> ProcessInfo:
    """Which of the machine's processes this is, from accelerate's :class:`~accelerate.PartialState`.

    Under ``accelerate launch`` (or torchrun) on GPUs each process gets one GPU and PartialState
    knows its index. When the launcher set ``WORLD_SIZE``/``RANK`` but accelerate did not set up a
    process group (e.g. CPU processes), the launcher's variables are used so that the processes
    still split the grid instead of all doing all of it; there is then no barrier. A plain run is
    process 0 of 1 (accelerate is not even imported).
    """
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return ProcessInfo()
    from accelerate import PartialState

    state = PartialState()
    if int(state.num_processes) == world:
        device = str(state.device) if state.device is not None and state.device.type != "cpu" else None
        return ProcessInfo(int(state.process_index), int(state.num_processes), device, True)
    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0)
    return ProcessInfo(rank, world, None, False)


def select_items(
    items: Sequence[BenchItem],
    shard: ShardSpec = ShardSpec(),
    process_index: int = 0,
    num_processes: int = 1,
) -> list[BenchItem]:
    """The items of this shard and, inside it, of this process (whole units, round robin)."""
    if num_processes < 1 or not 0 <= process_index < num_processes:
        raise BenchInputError(f"process {process_index} of {num_processes} is not a valid split")
    units = sorted({it.unit for it in items if shard.owns(it.unit)})
    mine = {u for j, u in enumerate(units) if j % num_processes == process_index}
    return [it for it in items if it.unit in mine]
