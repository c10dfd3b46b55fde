"""Where a study lives, how workers reach it, and its secrets.

`sweep.storage`: `sqlite` (`<study dir>/study.db`), `journal` (`<study dir>/journal.log`), an RDB URL
(`postgresql://user:pass@host/db`), `env` (the URL in `$CRABSWEEP_STORAGE`), or null (the default:
`$CRABSWEEP_STORAGE` when it is set, else sqlite). A URL's password is never written: `sweep.json`,
configs, logs and W&B hold it redacted, spawned workers get the URL through the environment (never
argv), and a study recorded with a redacted URL is reopened with `$CRABSWEEP_STORAGE`.
"""

from __future__ import annotations

import fcntl
import os
import zlib
from contextlib import contextmanager
from pathlib import Path

import optuna

from .. import io
from ..errors import UserError
from ..redact import MASK, redact_text

ENV = "CRABSWEEP_STORAGE"
_FILES = {"sqlite": "study.db", "journal": "journal.log"}


def storage_url(kind: str | None, study_dir: Path) -> str:
    """The URL of `sweep.storage=kind` for the study in `study_dir`."""
    if kind is None or kind == "env":
        env = os.environ.get(ENV)
        if kind == "env" and not env:
            raise UserError(f"sweep.storage=env but ${ENV} is not set; export {ENV}=postgresql://user:pass@host/db "
                            "(or pass sweep.storage=sqlite|journal)")
        kind = env or "sqlite"
    if kind == "sqlite":
        return f"sqlite:///{study_dir.resolve() / _FILES['sqlite']}"
    if kind == "journal":
        return f"journal:{study_dir.resolve() / _FILES['journal']}"
    return str(kind)


def local_file(url: str) -> Path | None:
    """The file of a sqlite or journal storage (None for a server)."""
    if url.startswith("sqlite:///"):
        return Path(url.removeprefix("sqlite:///"))
    if url.startswith("journal:"):
        return Path(url.removeprefix("journal:"))
    return None


def make_storage(url: str):
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend, JournalStorage
        return JournalStorage(JournalFileBackend(url.removeprefix("journal:")))
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
    except Exception as e:  # noqa: BLE001 — an unreachable or malformed URL is the user's to fix
        raise UserError(f"cannot open sweep.storage '{redact_text(url)}' ({type(e).__name__}); use sqlite, journal "
                        "or a reachable RDB URL such as postgresql://user:pass@host/db") from None


def public_overrides(overrides: list[str]) -> list[str]:
    """The overrides without secrets (a storage URL with a password becomes `sweep.storage=env`) and without
    `sweep.role`: what workers get on their command line and what every trial is composed from."""
    out = []
    for o in overrides:
        key, _, value = o.partition("=")
        key = key.lstrip("+~")
        if key == "sweep.role":
            continue
        if key == "sweep.storage" and redact_text(value) != value:
            o = "sweep.storage=env"
        out.append(o)
    return out


def worker_env(url: str) -> dict:
    """The environment of a worker process: this one's, plus the storage URL."""
    return {**os.environ, ENV: url}


_KNOWN: dict[str, str] = {}       # redacted → real URL, for the studies this process recorded


def write_record(study_dir: Path, meta: dict) -> None:
    shown = redact_text(meta["storage"])
    _KNOWN[shown] = meta["storage"]
    io.write_json(study_dir / "sweep.json", {**meta, "storage": shown})


def recorded_url(meta: dict, study_dir: Path) -> str:
    """The storage of a recorded study: its own file (even if the folder moved), or the URL — when the
    recorded one is redacted, the one this process recorded or `$CRABSWEEP_STORAGE`."""
    url = meta["storage"]
    for kind, name in _FILES.items():
        if url.startswith(kind) and (study_dir / name).exists():
            return storage_url(kind, study_dir)
    if MASK in url:
        if url in _KNOWN:
            return _KNOWN[url]
        env = os.environ.get(ENV)
        if env and redact_text(env) == url:
            return env
        raise UserError(f"the study's storage {url} has a password that is never written; export {ENV}=<the URL> "
                        "to open it")
    return url


def open_recorded_study(study_dir: str | Path) -> tuple[dict, optuna.Study]:
    """The `sweep.json` record and the Optuna study of a study folder."""
    study_dir = Path(study_dir)
    if not (study_dir / "sweep.json").exists():
        raise UserError(f"{study_dir} holds no sweep.json; pass the folder of a `crabsweep sweep` study")
    meta = io.read_json(study_dir / "sweep.json")
    try:
        study = optuna.load_study(study_name=meta["study"], storage=make_storage(recorded_url(meta, study_dir)))
    except KeyError as e:
        raise UserError(f"study {meta['study']} is not in its storage {meta['storage']}; was the storage reset?") from e
    return meta, study


@contextmanager
def study_lock(url: str, study_dir: Path, name: str):
    """Serialize "count, then ask" across workers: a file lock on one host, an advisory lock in PostgreSQL."""
    if url.startswith("postgresql"):
        import sqlalchemy
        engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
        key = zlib.crc32(f"crabsweep:{name}".encode())
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
        engine.dispose()
        return
    with open(study_dir / ".ask.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
