"""`crabsweep report <study dir>`: every trial of a sweep as a table, plus plots.

Writes `report.md` and `report.csv` (params, state, objective, per-round metrics, trajectory class),
`objective.png` (objective per attribution × K, or per parameter), `final_gap.png` (final gap per
round per chain) and Optuna's own plots (parallel coordinate, parameter importances, intermediate
values) into the study folder, and prints the command that opens optuna-dashboard on the storage.
"""

from __future__ import annotations

import csv
import logging
from io import StringIO
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import optuna  # noqa: E402

from .. import io  # noqa: E402
from ..loop.chain import completed_rounds  # noqa: E402

log = logging.getLogger(__name__)
ROUND_METRICS = ("final_gap", "specificity", "damage", "collateral", "heldout_loss", "top1_score")


def load(study_dir: str | Path) -> tuple[dict, optuna.Study]:
    from ..sweep.storage import open_recorded_study
    return open_recorded_study(study_dir)


def run_dir_of(trial, study_dir: Path | None = None) -> Path | None:
    """A trial's chain folder (recorded relative to the study folder; absolute in older studies)."""
    rel = trial.system_attrs.get("run_dir", trial.user_attrs.get("run_dir"))
    if not rel:
        return None
    path = Path(rel)
    return path if path.is_absolute() or study_dir is None else Path(study_dir) / path


def trial_rows(study: optuna.Study, study_dir: Path | None = None) -> list[dict]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        run_dir = run_dir_of(t, study_dir) or Path("")
        rounds = completed_rounds(run_dir) if run_dir_of(t) else []
        chain = io.read_json(run_dir / "chain.json") if (run_dir / "chain.json").exists() else {}
        rows.append({
            "trial": t.number, "state": t.state.name, "value": t.value, "params": dict(t.params),
            "trajectory": chain.get("trajectory", {}).get("class", t.user_attrs.get("trajectory")),
            "rounds": [{k: rec["metrics"].get(k) for k in ROUND_METRICS} for rec in rounds],
            "retry_of": t.system_attrs.get("failed_trial"),
            "cache_hits": t.system_attrs.get("cache_hits", t.user_attrs.get("cache_hits")),
            "cache_misses": t.system_attrs.get("cache_misses", t.user_attrs.get("cache_misses")),
        })
    return rows


def dashboard_command(meta: dict) -> str:
    from ..redact import MASK
    from ..sweep.storage import ENV
    storage = meta["storage"]
    target = storage.removeprefix("journal:") if storage.startswith("journal:") else storage
    if MASK in target:
        target = f'"${ENV}"   # {target}'                 # the password is never written
    return f"pip install optuna-dashboard && optuna-dashboard {target}"


def write_report(study_dir: str | Path) -> dict:
    study_dir = Path(study_dir)
    meta, study = load(study_dir)
    rows = trial_rows(study, study_dir)
    params = sorted({k for r in rows for k in r["params"]})
    n_rounds = max((len(r["rounds"]) for r in rows), default=0)
    header = ["trial", "state", meta["objective"]["metric"], *params, "trajectory",
              *(f"r{i}.final_gap" for i in range(n_rounds)), "cache hits/misses"]
    table = []
    for r in rows:
        gaps = [_fmt(x["final_gap"]) for x in r["rounds"]] + [""] * (n_rounds - len(r["rounds"]))
        table.append([r["trial"], r["state"] + (f" (retry of {r['retry_of']})" if r["retry_of"] is not None else ""),
                      _fmt(r["value"]), *(r["params"].get(p, "") for p in params), r["trajectory"] or "", *gaps,
                      f"{r['cache_hits']}/{r['cache_misses']}" if r["cache_hits"] is not None else ""])
    md = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(map(str, row)) + " |" for row in table]
    io.write_text(study_dir / "report.md", f"# Study {meta['study']}\n\nobjective: {meta['objective']}\n\n"
                  + "\n".join(md) + f"\n\ndashboard: `{dashboard_command(meta)}`\n")
    buf = StringIO()
    csv.writer(buf).writerows([header, *table])
    io.write_text(study_dir / "report.csv", buf.getvalue())
    images = {"objective": _plot_objective(rows, meta, study_dir / "objective.png"),
              "final_gap": _plot_gaps(rows, study_dir / "final_gap.png"), **_optuna_plots(study, study_dir)}
    return {"meta": meta, "header": header, "table": table, "rows": rows,
            "images": {k: v for k, v in images.items() if v is not None}}


def _fmt(x) -> str:
    return "" if x is None else f"{x:.4f}" if isinstance(x, float) else str(x)


def _plot_objective(rows, meta, path: Path) -> Path | None:
    done = [r for r in rows if r["value"] is not None]
    if not done:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    keys = sorted({k for r in done for k in r["params"]})
    by = [k for k in ("attribution", "k.k") if k in keys] or keys[:1]
    labels = [" / ".join(f"{k}={r['params'].get(k)}" for k in by) for r in done]
    order = sorted(set(labels))
    ax.scatter([order.index(lbl) for lbl in labels], [r["value"] for r in done])
    ax.set_xticks(range(len(order)), order, rotation=30, ha="right")
    ax.set(title=f"{meta['objective']['metric']} ({meta['objective']['direction']}) per trial", ylabel="objective")
    fig.tight_layout()
    io.save_figure(fig, path, dpi=90)
    plt.close(fig)
    return path


def _plot_gaps(rows, path: Path) -> Path | None:
    if not any(r["rounds"] for r in rows):
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        gaps = [x["final_gap"] for x in r["rounds"]]
        if gaps:
            ax.plot(range(len(gaps)), gaps, "o-", label=f"trial {r['trial']} ({r['state'].lower()})")
    ax.set(title="final gap per round", xlabel="round", ylabel="final loss − round 0's")
    ax.legend(fontsize=7)
    fig.tight_layout()
    io.save_figure(fig, path, dpi=90)
    plt.close(fig)
    return path


def _optuna_plots(study, study_dir: Path) -> dict[str, Path]:
    import warnings

    from optuna.visualization import matplotlib as ovm
    out = {}
    for name, fn in (("parallel_coordinate", ovm.plot_parallel_coordinate),
                     ("param_importances", ovm.plot_param_importances),
                     ("intermediate_values", ovm.plot_intermediate_values)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = fn(study)
            fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
            fig.set_size_inches(8, 5)
            fig.tight_layout()
            io.save_figure(fig, study_dir / f"{name}.png", dpi=80)
            plt.close(fig)
            out[name] = study_dir / f"{name}.png"
        except Exception as e:  # noqa: BLE001 — e.g. too few finished trials for importances
            log.info("optuna %s plot skipped: %s", name, e)
    return out
