"""The default sweep with and without the round cache, in one run.

    .venv/bin/python benchmarks/sweep_cache.py                # the default sweep (SmolLM2, 6 trials)
    .venv/bin/python benchmarks/sweep_cache.py model=tiny_llama task=tiny   # smoke run

Both sweeps run as fresh `crabsweep sweep` processes into their own sweep folders (so they share no
cache) over the same grid; the objective value of every point must agree between the two studies
(the cache may only save time, never change a result).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def sweep(work: Path, name: str, extra: list[str]) -> tuple[float, dict]:
    study_dir = work / name / f"bench-{name}"
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "crabsweep.cli", "sweep", f"sweep.study=bench-{name}",
                           f"sweep.dir={work / name}", *extra], capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if proc.returncode != 0:
        sys.exit(proc.stderr[-3000:])
    return seconds, json.loads((study_dir / "summary.json").read_text())


def values(study_dir: Path) -> list:
    from crabsweep.sweep.storage import open_recorded_study
    study = open_recorded_study(study_dir)[1]
    return sorted((sorted(t.params.items()), t.state.name, t.value) for t in study.get_trials())


def main() -> None:
    extra = sys.argv[1:]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cached, s_cached = sweep(work, "cache", ["sweep.cache=true", *extra])
        plain, s_plain = sweep(work, "nocache", ["sweep.cache=false", *extra])
        same = values(work / "cache" / "bench-cache") == values(work / "nocache" / "bench-nocache")
    print(f"default sweep {' '.join(extra) or '(embedded SmolLM2)'}: {sum(s_cached['states'].values())} trials")
    print(f"without round cache: {plain:7.1f}s")
    print(f"with round cache   : {cached:7.1f}s  ({s_cached['cache']['hits']} hits / {s_cached['cache']['misses']} misses)")
    print(f"speed-up           : {plain / cached:.2f}×  (goal ≥ 2×)")
    print(f"identical trials and objective values: {same}")


if __name__ == "__main__":
    main()
