"""Benchmark runner: IBench-compatible grids of identities x prompts x presets x seeds.

Submodules: ``datasets`` (input readers), ``datasets_multi`` (XVerseBench, MultiHuman-Testbench), ``grid`` (items, keys, shards), ``results`` (output folder,
IBench results JSON), ``runner`` (the resumable loop), ``generators`` (pipeline-backed generate and
encode functions), ``merge`` (joining shard outputs), ``samples`` (offline sample inputs), ``lock`` (one run per output
folder), ``integrity`` (damaged images, blank images, non-finite identity tokens).
"""

from spatialid.bench.datasets import (
    BenchInputError,
    Identity,
    PromptSpec,
    load_identities,
    load_prompts,
    parse_prompt_ids,
    render_prompt,
)
from spatialid.bench.datasets_multi import BenchInputs, load_bench_inputs
from spatialid.bench.grid import (
    BASELINE_PRESET,
    BenchItem,
    ShardSpec,
    build_grid,
    parse_shard,
    select_items,
)
from spatialid.bench.lock import FolderInUseError, bench_lock
from spatialid.bench.merge import MergeSummary, merge_runs
from spatialid.bench.results import (
    BenchStateError,
    PresetResults,
    load_manifest,
    load_preset_results,
)
from spatialid.bench.runner import (
    BenchSettings,
    BenchSummary,
    EmbeddingCache,
    run_bench,
)

__all__ = [
    "BASELINE_PRESET",
    "BenchInputError",
    "BenchInputs",
    "BenchItem",
    "BenchSettings",
    "BenchStateError",
    "BenchSummary",
    "EmbeddingCache",
    "FolderInUseError",
    "Identity",
    "MergeSummary",
    "PresetResults",
    "PromptSpec",
    "ShardSpec",
    "bench_lock",
    "build_grid",
    "load_bench_inputs",
    "load_identities",
    "load_manifest",
    "load_preset_results",
    "load_prompts",
    "merge_runs",
    "parse_prompt_ids",
    "parse_shard",
    "render_prompt",
    "run_bench",
    "select_items",
]
