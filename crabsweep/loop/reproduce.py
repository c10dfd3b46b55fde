"""`crabsweep reproduce <run dir>`: re-run a chain from its saved config and compare.

Checks the fingerprints (weights sha256, task files sha256, package versions, device) and then the
records round by round — suppressed sets, recruits, loss curves, metrics, generations, the control —
reporting either "identical" (bitwise on CPU) or the first difference. Wall-clock `timing` is ignored.
"""

from __future__ import annotations

from pathlib import Path

from .. import io
from ..config.schema import validate
from ..io import owned_run_dir
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
    validate(cfg)
    original = io.read_json(run_dir / "chain.json")
    records = _comparable(run_dir)                  # a damaged record is refused before the rerun, not after
    out = io.free_name(run_dir, "reproduce", first=1) if out_dir is None else Path(out_dir)
    if out.resolve() == run_dir.resolve() or run_dir.resolve().is_relative_to(out.resolve()):
        raise UserError(f"reproduce would write over the run it checks ({out}); pass a new output folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} already exists and is not empty; pass a new output folder for the rerun")
    with owned_run_dir(out, what="the rerun's folder"):
        save_config(cfg, [f"reproduce of {run_dir}"], out)
        session = Session(cfg)
        fp_diff = first_difference(original["fingerprints"], fingerprints(session))
        run_chain(session, out)
    diff = first_difference(records, _comparable(out))
    report = {"identical": diff is None, "first_difference": diff, "fingerprint_difference": fp_diff,
              "original": str(run_dir), "rerun": str(out), "rounds": len(completed_rounds(out))}
    io.write_json(out / "reproduce.json", report)
    return report
