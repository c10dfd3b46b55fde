"""A storage password is never written: a sweep against the loopback PostgreSQL with 2 workers and W&B offline
files, then every file under the sweep folder, the captured output and every process's command line
are searched for it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from crabsweep.cli import main
from crabsweep.io import read_json
from crabsweep.sweep.storage import ENV

PG_ADMIN = "postgresql://crabsweep:crabsweep@127.0.0.1:5432/crabsweep_test"


def _psql(sql: str) -> None:
    subprocess.run(["su", "postgres", "-c", f'psql -qtAX -c "{sql}"'], check=True, capture_output=True, text=True)


@pytest.fixture
def secret_storage():
    """A role with a distinctive password and a database it owns; dropped afterwards."""
    if os.geteuid() != 0 or subprocess.run(["su", "postgres", "-c", "psql -qtAX -c 'SELECT 1'"],
                                           capture_output=True).returncode != 0:
        if os.environ.get("CI"):
            pytest.fail("the loopback PostgreSQL is not reachable as the postgres user; scripts/postgres.sh starts it")
        pytest.skip("needs root and the loopback PostgreSQL (scripts/postgres.sh)")
    tag = uuid.uuid4().hex[:8]
    role, password, db = f"cs_role_{tag}", f"Pw{uuid.uuid4().hex}Zq", f"cs_db_{tag}"
    _psql(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
    _psql(f"CREATE DATABASE {db} OWNER {role}")
    try:
        yield f"postgresql://{role}:{password}@127.0.0.1:5432/{db}", password
    finally:
        _psql(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
        _psql(f"DROP ROLE IF EXISTS {role}")


def _cmdlines_with(needle: bytes, skip: set[int]) -> list[str]:
    hits = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) in skip:
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if needle in cmdline:
            hits.append(cmdline.replace(b"\0", b" ").decode(errors="replace"))
    return hits


def test_storage_password_is_never_written(tmp_path, secret_storage, capsys):
    url, password = secret_storage
    needle = password.encode()
    root = tmp_path / "sweeps"
    env = {k: v for k, v in os.environ.items() if k != ENV}
    cmd = [sys.executable, "-m", "crabsweep.cli", "sweep", "model=tiny_llama", "task=tiny", "eval.max_new_tokens=4",
           "tracker=wandb_offline", "sweep.pruner.name=none", "chain.rounds=1", "train.epochs=1",
           f"sweep.dir={root}", "sweep.study=secret", "sweep.n_trials=2", "sweep.workers=2",
           "sweep.params={k.k: [2, 3]}", f"sweep.storage={url}"]
    main_proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    leaks: list[str] = []
    workers: set[str] = set()
    while main_proc.poll() is None:                 # the user typed it on the main's command line; nobody else has it
        leaks += _cmdlines_with(needle, {main_proc.pid, os.getpid()})
        workers |= set(_cmdlines_with(b"sweep.role=worker", {os.getpid()}))
        time.sleep(0.2)
    out, err = main_proc.communicate()
    assert main_proc.returncode == 0, err.decode()[-3000:]
    assert not leaks, leaks
    assert len(workers) == 1 and "sweep.storage=env" in workers.pop()           # the spawned worker was seen
    assert needle not in out and needle not in err

    files = [p for p in root.rglob("*") if p.is_file()]
    assert any("wandb" in p.parts and p.suffix == ".wandb" for p in files)       # W&B offline runs were written
    assert {"sweep.json", "report.md", "report.csv", "summary.json", "config.yaml", "crabsweep.log"} <= {p.name for p in files}
    assert [str(p) for p in files if needle in p.read_bytes()] == []
    assert read_json(root / "secret" / "sweep.json")["storage"] == url.replace(password, "***")   # recorded, redacted

    # reading the study back needs the URL from the environment, never from a file
    assert main(["report", str(root / "secret")]) == 2
    assert ENV in capsys.readouterr().err
    os.environ[ENV] = url
    try:
        assert main(["report", str(root / "secret")]) == 0
    finally:
        del os.environ[ENV]
    printed = capsys.readouterr()
    assert password not in printed.out + printed.err and f'"${ENV}"' in printed.out
    assert [str(p) for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()] == []
