"""Files and folders that are complete or absent, and never someone else's.

- Every file is written to a temporary name and renamed (`write_text`, `write_json`, `write_tensors`);
  JSON is strict (a non-finite float is written as null, never as a bare NaN).
- `staged_dir(target)` builds a folder beside `target` and renames it into place only when complete;
  an existing `target` is never replaced (FileExistsError).
- `owned_run_dir(path)` is the scope of a command's run folder: it takes a lock (a second process on the
  same folder is refused), and if this invocation created the folder and fails before anything in it is
  complete, it removes what it made — and only that.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file

from .errors import UserError

_UMASK = os.umask(0)
os.umask(_UMASK)


def write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_figure(fig, path: str | Path, **kwargs) -> None:
    """`fig.savefig` to a temporary name, then renamed: a plot is complete or absent."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        fig.savefig(tmp, **kwargs)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def finite(obj):
    """The JSON-like value with every non-finite float replaced by None (strict JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def write_json(path: str | Path, obj) -> None:
    write_text(path, json.dumps(finite(obj), indent=2, allow_nan=False) + "\n")


def read_json(path: str | Path):
    """A strict JSON file; a truncated or malformed one is a one-line UserError naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is damaged ({type(e).__name__}: {e}); it was not written completely — "
                        "restore it or start a new run folder") from e


def write_tensors(path: str | Path, tensors: dict[str, torch.Tensor]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def staged_dir(target: str | Path):
    """Yield a temp folder beside `target`; on success it becomes `target` in one rename.

    An existing `target` is never replaced: FileExistsError (before or at the rename)."""
    target = Path(target)
    if target.exists():
        raise FileExistsError(f"{target} exists")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    os.chmod(tmp, 0o777 & ~_UMASK)   # mkdtemp makes 0700; a finished folder gets the usual mode
    try:
        yield tmp
        if target.exists():
            raise FileExistsError(f"{target} exists")
        os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def owned_run_dir(path: str | Path, complete=lambda p: any(p.glob("round_*/record.json"))):
    """The scope of a command's run folder: locked; removed on failure only if we made it and it holds
    nothing complete. Leftover temp folders of a killed earlier run are cleaned on entry."""
    path = Path(path)
    created = not path.exists()
    if path.exists() and not path.is_dir():
        raise UserError(f"run dir {path} is a file; pass hydra.run.dir=<a folder>")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create run dir {path} ({e.strerror}); pass a writable hydra.run.dir") from e
    try:
        lock = open(path / ".lock", "w")
    except OSError as e:
        if created:
            shutil.rmtree(path, ignore_errors=True)
        raise UserError(f"cannot write in run dir {path} ({e.strerror}); pass a writable hydra.run.dir") from e
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise UserError(f"another crabsweep process is running in {path}; wait for it or use another "
                        "hydra.run.dir") from None
    try:
        for p in [*path.glob(".round_*.tmp-*"), *path.glob("round_*/.control.tmp-*")]:
            shutil.rmtree(p, ignore_errors=True)       # what a killed earlier run of this folder left half-made
        yield path
    except BaseException:
        if created and not complete(path):
            lock.close()
            shutil.rmtree(path, ignore_errors=True)
        raise
    finally:
        if not lock.closed:
            fcntl.flock(lock, fcntl.LOCK_UN)
            lock.close()
