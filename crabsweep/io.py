"""Files and folders that are complete or absent, and never someone else's.

- Every file is written to a temporary name and renamed (`write_text`, `write_json`, `write_tensors`);
  JSON is strict (a non-finite float is written as null, never as a bare NaN).
- `staged_dir(target)` builds a folder beside `target` and renames it into place only when complete;
  an existing `target` is never replaced (FileExistsError).
- `owned_run_dir(path)` is the scope of a command's run folder: it takes a lock (a second process on the
  same folder is refused), refuses a folder that holds someone else's files, and if the command fails
  before anything in it is complete, it removes what this invocation made — and only that.
- `check_new(path, what)` refuses, before any work, an output path that exists or cannot be created.
- `save_figure(fig, path)` writes a matplotlib figure like any other file (temp + rename).
"""

from __future__ import annotations

import fcntl
import io as _io
import json
import logging
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from .errors import UserError

log = logging.getLogger(__name__)
UNREADABLE = (OSError, ValueError, SafetensorError)   # what reading a truncated or damaged file raises
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


def save_figure(fig, path: str | Path, **savefig_kwargs) -> None:
    """`fig.savefig` into memory, then written atomically: a plot is complete or absent, never 0 bytes."""
    path = Path(path)
    buf = _io.BytesIO()
    fig.savefig(buf, format=path.suffix.lstrip(".") or "png", **savefig_kwargs)
    write_bytes(path, buf.getvalue())


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


def _missing(path: Path) -> list[Path]:
    """`path` and those of its ancestors that do not exist yet, deepest first (what a mkdir -p would make)."""
    out = []
    while not (path.exists() or path.is_symlink()) and path != path.parent:
        out.append(path)
        path = path.parent
    return out


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _remove_empty(folders: list[Path]) -> None:
    """Remove folders we made, deepest first, as long as they are empty (a concurrent process's are kept)."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def free_name(parent: str | Path, stem: str, first: int = 0) -> Path:
    """`parent/stem` (with first=0), else the first free `parent/stem-<i>`: a new folder beside earlier ones."""
    for i in range(first, 100_000):
        path = Path(parent) / (f"{stem}-{i}" if i else stem)
        if not (path.exists() or path.is_symlink()):
            return path
    raise UserError(f"{parent} holds too many {stem}-<i> folders; pass an output folder")


def check_new(path: str | Path, what: str) -> Path:
    """A path this command will create: refused now (one line) if it exists or cannot be made, so that
    nothing is overwritten and no work is lost at the end."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        raise UserError(f"{what}={path} already exists; pass a new path (nothing was overwritten)")
    parent = _missing(path)[-1].parent
    if not parent.is_dir():
        raise UserError(f"{what}={path} lies under {parent}, which is a file; pass a path inside a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{what}={path}: cannot write in {parent}; pass a writable location")
    return path


@contextmanager
def staged_dir(target: str | Path):
    """Yield a temp folder beside `target`; on success it becomes `target` in one rename.

    An existing `target` is never replaced: FileExistsError (before or at the rename)."""
    target = Path(target)
    if target.exists():
        raise FileExistsError(f"{target} exists")
    made = _missing(target.parent)
    target.parent.mkdir(parents=True, exist_ok=True)
    done = False
    try:
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
        os.chmod(tmp, 0o777 & ~_UMASK)   # mkdtemp makes 0700; a finished folder gets the usual mode
        try:
            yield tmp
            if target.exists():
                raise FileExistsError(f"{target} exists")
            os.rename(tmp, target)
            done = True
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if not done:
            _remove_empty(made)             # parent folders this call made for a target that never came


_LEFTOVERS = (".*.tmp*", ".hydra/.*.tmp*", "round_*/.*.tmp*")   # io's temp names: .<name>.tmp<pid> / .tmp-<x>
_HELD: set[str] = set()       # run folders this process holds: a nested owned_run_dir on one is a no-op


@contextmanager
def owned_run_dir(path: str | Path, complete=lambda p: any(p.glob("round_*/record.json")), resume: bool = False,
                  what: str = "hydra.run.dir"):
    """The scope of a command's run folder.

    - A folder that exists must be empty — or, with `resume`, a crabsweep run folder (it holds the `.lock`
      every command takes, or .hydra/config.yaml); anything else is someone else's and is refused untouched.
    - A lock: a second crabsweep process on the same folder is refused with one line.
    - Temp files and folders a killed earlier run left behind (io's `.<name>.tmp…`) are removed on entry.
    - If the command fails before `complete(path)`, everything this invocation made is removed (the folder
      and the parents it created, or the new entries of a folder that existed); nothing else is touched.
    Nested on a folder this process already holds (the command's scope around the API's), it does nothing."""
    path = Path(path)
    if os.path.realpath(path) in _HELD:
        yield path
        return
    if path.exists() and not path.is_dir():
        raise UserError(f"{what}={path} is a file; pass a folder")
    made = _missing(path)
    try:
        before = set() if made else set(os.listdir(path))
    except OSError as e:
        raise UserError(f"cannot read {what}={path} ({e.strerror}); pass a folder you can write in") from e
    ours = ".lock" in before or (path / ".hydra" / "config.yaml").is_file()
    if before and (not ours or not (resume or ".lock" in before)):
        raise UserError(f"{what}={path} already holds {'an earlier run' if ours else 'files'}; pass a new or "
                        "empty folder (nothing was changed)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        _remove_empty(made)
        raise UserError(f"cannot create {what}={path} ({e.strerror}); pass a writable folder") from e
    try:
        lock = open(path / ".lock", "a")
    except OSError as e:
        _remove_empty(made)
        raise UserError(f"cannot write in {what}={path} ({e.strerror}); pass a writable folder") from e
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise UserError(f"another crabsweep process is working in {path}; wait for it to finish or pass another "
                        "folder") from None
    if before and not resume:                   # checked under the lock: a busy folder says so first
        lock.close()
        raise UserError(f"{what}={path} already holds an earlier run; pass a new or empty folder (nothing was "
                        "changed)")
    held = os.path.realpath(path)
    _HELD.add(held)
    try:
        for p in [q for pattern in _LEFTOVERS for q in path.glob(pattern)]:
            log.info("removing %s, left half-made by an earlier run that was killed", p)
            _remove(p)
        yield path
    except BaseException:
        if not complete(path):             # still holding the lock while removing
            if made:
                _remove(path)
                _remove_empty(made[1:])
            else:
                for name in set(os.listdir(path)) - before:
                    _remove(path / name)
        raise
    finally:
        _HELD.discard(held)
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()
