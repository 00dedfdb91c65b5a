"""Writing files safely: a folder proved writable without creating anything, files written to a temporary name
and renamed into place (an interrupted run never leaves a partial file under a final name), JSON without NaN."""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from pathlib import Path

import torch


def check_writable(folder: Path, *, must_exist: bool = False, option: str = "--out") -> Path:
    """Prove that files can be written in ``folder`` without creating anything: a missing folder is created when
    the outputs are written (its nearest existing parent is probed), or refused with ``must_exist``. ValueError
    naming it (and the command-line ``option`` it came from) otherwise."""
    folder = Path(folder)
    probe = folder
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise ValueError(f"{option}: cannot write to {folder}: {probe} is a file")
    if must_exist and probe != folder:
        raise ValueError(f"{option}: folder {folder} does not exist")
    try:  # a temporary file, removed at once: read-only file systems and permissions answer here
        fd, tmp = tempfile.mkstemp(prefix=".write-test-", dir=probe)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise ValueError(f"{option}: cannot write to {folder}: {e.strerror or e}") from None
    return folder


def write_atomic(path: Path, data: bytes) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the final file ordinary permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _clean(o):
    """JSON has no infinities: write them as null."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    return o


def json_bytes(obj) -> bytes:
    return (json.dumps(_clean(obj), indent=1, default=_json_default, allow_nan=False) + "\n").encode()
