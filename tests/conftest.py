"""Shared test fixtures. Everything runs offline on CPU with small random-weight models."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
LAYOUT_FILE = SHARED / "reference" / "pulid_flux_checkpoint_layout.json"


@pytest.fixture(scope="session")
def pulid_layout() -> dict[str, list[int]]:
    """Tensor name -> shape of the published PuLID-FLUX checkpoint (from ../shared)."""
    if not LAYOUT_FILE.exists():
        pytest.skip(f"reference layout not found at {LAYOUT_FILE}")
    return json.loads(LAYOUT_FILE.read_text())["tensors"]
