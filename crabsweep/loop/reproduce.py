"""`crabsweep reproduce <run dir>`: re-run a chain from its saved config and compare.

Checks the fingerprints (weights sha256, task files sha256, package versions, device) and then the
records round by round — suppressed sets, recruits, loss curves, metrics, generations, the control —
reporting either "identical" (bitwise on CPU) or the first difference. Wall-clock `timing` is ignored.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .. import io
from .chain import completed_rounds, fingerprints, run_chain
from ..config import first_difference, load_saved_config, save_config
from ..errors import UserError
from ..core.session import Session


def _comparable(run_dir: Path) -> list[dict]:
    out = []
    for r, rec in enumerate(completed_rounds(run_dir)):
        rec = {k: v for k, v in rec.items() if k != "timing"}
        control = run_dir / f"round_{r}" / "control" / "record.json"
        if control.exists():
            rec["control"] = {k: v for k, v in io.read_json(control).items() if k != "timing"}
        out.append(rec)
    return out


def reproduce(run_dir: str | Path, out_dir: str | Path | None = None) -> dict:
    run_dir = Path(run_dir)
    if not (run_dir / "chain.json").exists():
        raise UserError(f"{run_dir} holds no chain.json; pass the folder of a finished `crabsweep chain` run")
    cfg = load_saved_config(run_dir)
    original = io.read_json(run_dir / "chain.json")
    out = Path(out_dir) if out_dir else run_dir / "reproduce"
    if out.exists():
        shutil.rmtree(out)
    save_config(cfg, [f"reproduce of {run_dir}"], out)
    session = Session(cfg)
    fp_diff = first_difference(original["fingerprints"], fingerprints(session))
    run_chain(session, out)
    diff = first_difference(_comparable(run_dir), _comparable(out))
    report = {"identical": diff is None, "first_difference": diff, "fingerprint_difference": fp_diff,
              "original": str(run_dir), "rerun": str(out), "rounds": len(completed_rounds(out))}
    io.write_json(out / "reproduce.json", report)
    return report
