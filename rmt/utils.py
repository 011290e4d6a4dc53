"""Small helpers shared by the whole package."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, TypeVar

if TYPE_CHECKING:
    import torch


T = TypeVar("T")


def exists(value) -> bool:
    return value is not None


def default(value: T | None, fallback: T) -> T:
    return value if exists(value) else fallback


def resolve_device(device: "str | torch.device" = "auto") -> "torch.device":
    """`auto` means CUDA when present, else the CPU; anything else is passed to torch."""
    import torch

    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda":
        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if device.index is not None and device.index >= available or not available:
            raise ValueError(f"Device {device} was asked for, but this machine has {available} CUDA device(s): "
                             "use device 'auto' (CUDA when present, else the CPU) or 'cpu'")
    return device


def write_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write a text file all at once (a temporary sibling renamed onto `path`): a reader, or
    a workflow manager after a crash, sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(path.name + ".tmp")
    staging.write_text(text)
    staging.replace(path)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Write a directory all at once: yields a temporary sibling, renamed onto `target` on
    success. A crash leaves either the old directory or the new one, never a mix; on error
    the temporary directory is removed and `target` is untouched."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    staging.chmod(0o777 & ~_umask())  # mkdtemp's 0700 would hide results from a cluster group
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if target.exists():
        # Two renames keep the window without a complete `target` as short as possible;
        # `recover_directory` puts the retired copy back after a crash inside it.
        retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, retired / target.name)
        os.replace(staging, target)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, target)


def recover_directory(target: str | os.PathLike) -> None:
    """After a crash (kill -9) inside `atomic_directory`: put the complete copy that was being
    replaced back when `target` is missing, and remove half-written staging folders. Only for
    a directory with a single writer, before it writes again."""
    target = Path(target)
    if not target.parent.is_dir():
        return
    if not target.exists():
        retired = sorted(target.parent.glob(f".{target.name}.old-*/{target.name}"), key=lambda p: p.stat().st_mtime)
        if retired:
            os.replace(retired[-1], target)
    for kind in ("tmp", "old"):  # the prefixes atomic_directory gives its temporary folders
        for leftover in target.parent.glob(f".{target.name}.{kind}-*"):
            shutil.rmtree(leftover, ignore_errors=True)
