"""Reading and writing safetensors files, their errors as this package reports them.

Apart from flamingo.model.weights (model directories) so that the modules it builds on, such as
flamingo.model.lora (adapter files), can use them without importing it back.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from flamingo.errors import CheckpointError


@contextlib.contextmanager
def safetensors_os_errors() -> Iterator[None]:
    """safetensors reports a failed write (disk full, read-only) as a SafetensorError: re-raise it
    as the OSError it is, which the output writers (flamingo.outputs, checkpoints) turn into a
    user error naming the path and clean up after."""
    try:
        yield
    except SafetensorError as err:
        found = re.search(r"\(os error (\d+)\)", str(err))
        if found is None:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code)) from None


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' save_file, its write errors as OSError (see `safetensors_os_errors`)."""
    with safetensors_os_errors():
        save_file(tensors, str(path), metadata=metadata)


def load_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"weights file {path} is not a readable safetensors file: {err}") from None
