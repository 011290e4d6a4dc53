"""Small helpers shared by the whole package."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, TypeVar

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


# What tqdm writes to place nested bars on a terminal (cursor up, clear line): in a log file
# they are noise, and a nested bar's line stands alone there anyway (it carries its desc).
_CURSOR_CONTROL = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class _LinePerUpdate:
    """A log file's view of a progress bar: each refresh on a line of its own, instead of
    carriage returns that pile every update into one endless line."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        for piece in re.split(r"[\r\n]", _CURSOR_CONTROL.sub("", text)):
            if piece.strip():
                self.stream.write(piece.strip() + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(iterable=None, **kwargs):
    """tqdm on a terminal; in a log file (Snakemake, SLURM), a line every 30 seconds at most,
    per bar (a bar nested in another, e.g. the examples of one length, writes its own lines)."""
    import sys

    from tqdm import tqdm

    if not sys.stderr.isatty():
        kwargs = {"file": _LinePerUpdate(sys.stderr), "mininterval": 30.0, "ascii": True, **kwargs,
                  # A log cannot erase a finished bar: its last line (count, time, rate) is kept.
                  "leave": True}
    return tqdm(iterable, **kwargs)


class UserError(Exception):
    """A problem the user fixes (the message says how), besides bad values (ValueError) and
    files, disks and permissions (OSError): the CLI prints it without a traceback."""


class OutputConflict(FileExistsError):
    """An output path holds something rmt did not write there: it is never replaced."""


def claim_output(path: str | os.PathLike, *, kind: str, ours: Callable[[Path], bool]) -> Path:
    """Refuse, before any work, an output `path` that exists and is not rmt's own earlier
    output of this `kind` (`ours` recognises it, by a marker file or its contents): a
    command replaces only what it wrote itself, never a user's file or folder."""
    path = Path(path)
    if (path.exists() or path.is_symlink()) and not ours(path):
        what = "folder" if path.is_dir() else "file"
        raise OutputConflict(
            f"{path} is an existing {what} that is not {kind} written by rmt, and rmt replaces only its own "
            "output: move it away, or choose another output path"
        )
    return path


def has_marker(marker: str) -> Callable[[Path], bool]:
    """`ours` for a folder that rmt recognises by a file it always writes into it, or an
    empty folder (a workflow manager creates the folders of its jobs' outputs first)."""
    def ours(path: Path) -> bool:
        return path.is_dir() and not path.is_symlink() and ((path / marker).is_file() or not any(path.iterdir()))

    return ours


def text_starts_with(prefix: str) -> Callable[[Path], bool]:
    """`ours` for a text file rmt recognises by how it begins (a CSV header, a generated-file
    notice)."""
    def ours(path: Path) -> bool:
        try:
            with open(path, encoding="utf-8") as handle:
                return handle.read(len(prefix)) == prefix
        except (OSError, UnicodeDecodeError):
            return False

    return ours


def json_with(*keys: str) -> Callable[[Path], bool]:
    """`ours` for a JSON object rmt recognises by keys it always writes."""
    def ours(path: Path) -> bool:
        import json

        try:
            value = json.loads(path.read_text())
        except (OSError, ValueError):
            return False
        return isinstance(value, dict) and set(keys) <= set(value)

    return ours


def write_atomic(path: str | os.PathLike, text: str, *, kind: str = "a file",
                 ours: Callable[[Path], bool] = lambda path: path.is_file()) -> Path:
    """Write a text file all at once (a temporary sibling renamed onto `path`): a reader, or
    a workflow manager after a crash, sees the old file or the new one, never half of one.
    An existing `path` is replaced only when `ours` recognises it (by default: any file,
    for the files inside rmt's own folders; never a folder)."""
    path = claim_output(path, kind=kind, ours=ours)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(path.name + ".tmp")
    try:
        staging.write_text(text)
        staging.replace(path)
    except BaseException:
        staging.unlink(missing_ok=True)  # a full disk, say: leave nothing half-written behind
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_directory(target: str | os.PathLike, *, marker: str | None = None,
                     ours: Callable[[Path], bool] | None = None, kind: str = "a folder") -> Iterator[Path]:
    """Write a directory all at once: yields a temporary sibling, renamed onto `target` on
    success. A crash leaves either the old directory or the new one, never a mix; on error
    the temporary directory is removed and `target` is untouched. An existing `target` is
    replaced only if it holds `marker`, a file every such folder of rmt's holds (or, where
    a file name is not enough, if `ours(target)` says it is rmt's)."""
    ours = ours or has_marker(marker)
    target = claim_output(target, kind=kind, ours=ours)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    staging.chmod(0o777 & ~_umask())  # mkdtemp's 0700 would hide results from a cluster group
    try:
        yield staging
        claim_output(target, kind=kind, ours=ours)  # nothing else appeared there meanwhile
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
