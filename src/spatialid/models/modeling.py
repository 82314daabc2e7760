"""diffusers ``ModelMixin`` restricted to safetensors.

diffusers' ``save_pretrained`` can write pickles (``safe_serialization=False``, a custom
``save_function``) and its ``from_pretrained`` silently falls back to ``.bin`` pickles when no
safetensors file is found. Unpickling can run arbitrary code, and spatialid never does it (see
:mod:`spatialid.models.checkpoint`), so the PuLID modules inherit these narrowed entry points.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Callable, TypeVar

from diffusers import ModelMixin

from spatialid.errors import CheckpointError

__all__ = ["SafetensorsModelMixin"]

_M = TypeVar("_M", bound="SafetensorsModelMixin")

_SPATIALID_MODELS = ("IDFormer", "PerceiverAttentionCA", "PuLIDFluxModel")
_EMPTY_FP32_WARNING = re.compile(
    r"There are modules in (%s) that should be kept in float32: (\[\]|None)\." % "|".join(_SPATIALID_MODELS)
)


class _NoEmptyFp32Warning(logging.Filter):
    """Drop diffusers' ``.to(dtype)`` warning for our models when it names no module.

    ``ModelMixin.to`` warns about "modules that should be kept in float32" on every dtype cast, even
    when the list is empty; ours keep none in float32, so the message would be noise in every CLI run.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not _EMPTY_FP32_WARNING.match(record.getMessage())


def _install_filter() -> None:
    log = logging.getLogger("diffusers.models.modeling_utils")
    if not any(isinstance(f, _NoEmptyFp32Warning) for f in log.filters):
        log.addFilter(_NoEmptyFp32Warning())


_install_filter()


def _check_local_index(folder: Path) -> None:
    """A safetensors shard index may name any file; refuse one that points at non-safetensors files."""
    for index in folder.glob("*.safetensors.index.json"):
        try:
            weight_map = json.loads(index.read_text()).get("weight_map", {})
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{index} is not a readable shard index ({exc})") from exc
        bad = sorted({str(f) for f in weight_map.values() if not str(f).endswith(".safetensors")})
        if bad:
            raise CheckpointError(
                f"{index} lists non-safetensors shards ({', '.join(bad[:5])}); spatialid only reads safetensors"
            )


class SafetensorsModelMixin(ModelMixin):
    """``ModelMixin`` whose ``save_pretrained`` / ``from_pretrained`` only write and read safetensors."""

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        is_main_process: bool = True,
        save_function: Callable | None = None,
        safe_serialization: bool = True,
        variant: str | None = None,
        max_shard_size: int | str = "10GB",
        push_to_hub: bool = False,
        **kwargs: Any,
    ) -> None:
        """Write ``config.json`` + ``diffusion_pytorch_model.safetensors`` (pickles are refused)."""
        name = type(self).__name__
        if not safe_serialization:
            raise ValueError(f"{name}.save_pretrained writes safetensors only (safe_serialization=False refused)")
        if save_function is not None:
            raise ValueError(f"{name}.save_pretrained does not take a custom save_function (safetensors only)")
        super().save_pretrained(
            save_directory,
            is_main_process=is_main_process,
            save_function=None,
            safe_serialization=True,
            variant=variant,
            max_shard_size=max_shard_size,
            push_to_hub=push_to_hub,
            **kwargs,
        )

    @classmethod
    def from_pretrained(cls: type[_M], pretrained_model_name_or_path: str | os.PathLike | None, **kwargs: Any) -> _M:
        """diffusers' loader with ``use_safetensors=True`` forced: no fallback to ``.bin`` pickles."""
        if kwargs.get("use_safetensors") not in (None, True):
            raise ValueError(f"{cls.__name__}.from_pretrained reads safetensors only (use_safetensors=False refused)")
        if kwargs.get("use_flashpack"):
            raise ValueError(f"{cls.__name__}.from_pretrained reads safetensors only (use_flashpack refused)")
        kwargs["use_safetensors"] = True
        if pretrained_model_name_or_path is not None:
            folder = Path(os.fspath(pretrained_model_name_or_path)) / (kwargs.get("subfolder") or "")
            if folder.is_dir():
                _check_local_index(folder)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
