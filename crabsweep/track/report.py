"""`crabsweep report <study dir>`: every trial of a sweep as tables and plots, for people and programs.

Writes into the study folder:
  report.csv    one row per trial, numbers at full precision: state, value (the objective), params,
                trajectory class, cache hits, and every per-round metric as `r<k>.<metric>`
  report.md     the same, rounded for reading, with links to the plots
  report.html   self-contained (open it anywhere): tables, the PNGs embedded, Optuna's interactive
                plotly plots, and the recruit-overlap matrices of the study's chains
  *.png         objective per trial, the objective and final gap per round, Optuna's plots

Trials' chain folders are found relative to the study folder (whatever the recorded form), so the report
is the same from any working directory; if some cannot be found, an existing report is left untouched.
"""

from __future__ import annotations

import base64
import html
import logging
from pathlib import Path

import optuna
import pandas as pd

from .. import io
from ..errors import UserError
from ..loop.chain import completed_rounds
from . import plots
from .records import CORE, scalar_metrics

log = logging.getLogger(__name__)


def load(study_dir: str | Path) -> tuple[dict, optuna.Study]:
    from ..sweep.storage import open_recorded_study
    return open_recorded_study(study_dir)


def run_dir_of(trial, study_dir: Path | None = None) -> Path | None:
    """A trial's chain folder. Recorded relative to the study folder (current sweeps), absolute, or relative
    to the directory the sweep was launched from (older sweeps): the first candidate that exists wins —
    the path under the study folder, the trial folder's name under it, the path as recorded."""
    rel = trial.system_attrs.get("run_dir", trial.user_attrs.get("run_dir"))
    if not rel:
        return None
    path = Path(rel)
    if study_dir is None:
        return path
    study_dir = Path(study_dir)
    candidates = [path] if path.is_absolute() else [study_dir / path]
    candidates += [study_dir / path.name, path]
    return next((c for c in candidates if c.is_dir()), candidates[0])


def trial_rows(study: optuna.Study, study_dir: Path | None = None) -> list[dict]:
    """One dict per trial: params, state, value, trajectory, each completed round's scalar metrics, and
    `missing` (a chain folder was recorded but is not found)."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        run_dir = run_dir_of(t, study_dir)
        chain = io.read_json(run_dir / "chain.json") if run_dir and (run_dir / "chain.json").exists() else {}
        rounds = chain.get("rounds") or (completed_rounds(run_dir) if run_dir and run_dir.is_dir() else [])
        rows.append({
            "trial": t.number, "state": t.state.name, "value": t.value, "params": dict(t.params),
            "trajectory": chain.get("trajectory", {}).get("class", t.user_attrs.get("trajectory")),
            "rounds": [scalar_metrics(rec["metrics"]) for rec in rounds],
            "retry_of": t.system_attrs.get("failed_trial"),
            "cache_hits": t.system_attrs.get("cache_hits", t.user_attrs.get("cache_hits")),
            "cache_misses": t.system_attrs.get("cache_misses", t.user_attrs.get("cache_misses")),
            "run_dir": _relative(run_dir, study_dir) if run_dir else None,
            "missing": run_dir is not None and not run_dir.is_dir(),
        })
    return rows


def _relative(path: Path, base: Path | None) -> str:
    try:
        return str(path.resolve().relative_to(Path(base).resolve())) if base is not None else str(path)
    except ValueError:
        return str(path)


def trial_frame(rows: list[dict]) -> pd.DataFrame:
    """The report's table: one row per trial, per-round metrics as `r<k>.<metric>` columns."""
    out = []
    for r in rows:
        row = {"trial": r["trial"], "state": r["state"], "retry_of": r["retry_of"], "value": r["value"],
               **{f"params.{k}": v for k, v in sorted(r["params"].items())}, "trajectory": r["trajectory"],
               "rounds_completed": len(r["rounds"]), "cache_hits": r["cache_hits"],
               "cache_misses": r["cache_misses"], "run_dir": r["run_dir"]}
        for i, metrics in enumerate(r["rounds"]):
            row.update({f"r{i}.{k}": v for k, v in metrics.items()})
        out.append(row)
    frame = pd.DataFrame(out)
    for col in ("retry_of", "cache_hits", "cache_misses"):
        if col in frame:
            frame[col] = frame[col].astype("Int64")
    return frame


def display_frame(frame: pd.DataFrame, meta: dict) -> pd.DataFrame:
    """The columns a person reads first: trial, state, value, params, trajectory, the objective per round."""
    metric = meta["objective"]["metric"]
    per_round = [c for c in frame.columns if c.startswith("r") and c.endswith(f".{metric}")]
    keep = ["trial", "state", "value", *[c for c in frame.columns if c.startswith("params.")], "trajectory",
            *per_round]
    shown = frame[[c for c in keep if c in frame.columns]].rename(columns=lambda c: c.removeprefix("params."))
    if "cache_hits" in frame and frame["cache_hits"].notna().any():
        shown = shown.assign(**{"cache hit/miss": [f"{h}/{m}" if not pd.isna(h) else ""
                                                   for h, m in zip(frame["cache_hits"], frame["cache_misses"])]})
    return shown


def dashboard_command(meta: dict) -> str:
    from ..redact import MASK
    from ..sweep.storage import ENV
    storage = meta["storage"]
    target = storage.removeprefix("journal:") if storage.startswith("journal:") else storage
    if MASK in target:
        target = f'"${ENV}"   # {target}'                 # the password is never written
    return f"pip install optuna-dashboard && optuna-dashboard {target}"


def write_report(study_dir: str | Path, write: bool = True) -> dict:
    """Write the report files (with `write=False`: only read the tables, and list the plots already there)."""
    study_dir = Path(study_dir)
    meta, study = load(study_dir)
    rows = trial_rows(study, study_dir)
    files = [study_dir / n for n in ("report.csv", "report.md", "report.html")]
    if not write:
        frame = trial_frame(rows)
        return {"meta": meta, "frame": frame, "display": display_frame(frame, meta), "rows": rows, "files": files,
                "images": {p.stem: p for p in sorted(study_dir.glob("*.png"))}}
    missing = [r for r in rows if r["missing"]]
    if missing and (study_dir / "report.csv").exists():
        raise UserError(f"{len(missing)} of {len(rows)} trials' chain folders are not found (e.g. "
                        f"{missing[0]['run_dir']}); the existing report was left as it is — pass the study folder "
                        "that holds the trial_* folders")
    for r in missing:
        log.warning("trial %d: chain folder %s not found; its per-round metrics are left out", r["trial"], r["run_dir"])
    frame = trial_frame(rows)
    io.write_text(study_dir / "report.csv", frame.to_csv(index=False))
    images = {"objective": plots.plot_objective(rows, meta, study_dir / "objective.png")}
    metric = meta["objective"]["metric"]
    for m in dict.fromkeys([metric, "final_gap"]):
        images[f"{m}_per_round"] = plots.plot_metric_per_round(rows, m, meta["study"], study_dir / f"{m}.png")
    images.update(plots.optuna_pngs(study, meta, study_dir))
    images = {k: v for k, v in images.items() if v is not None}
    shown = display_frame(frame, meta)
    io.write_text(study_dir / "report.md", _markdown(meta, shown, images))
    io.write_text(study_dir / "report.html", _html(meta, study, study_dir, frame, shown, images))
    return {"meta": meta, "frame": frame, "display": shown, "rows": rows, "images": images, "files": files}


# --------------------------------------------------------------------------------------------------
def _fmt(x) -> str:
    if x is None or (not isinstance(x, (list, dict)) and pd.isna(x)):
        return ""
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def _markdown(meta: dict, shown: pd.DataFrame, images: dict[str, Path]) -> str:
    obj = meta["objective"]
    lines = [f"# Study {meta['study']}", "",
             f"value = the last completed round's `{obj['metric']}` ({obj['direction']}). Full-precision numbers "
             "and every per-round metric: `report.csv`; interactive plots: `report.html`.", "",
             "| " + " | ".join(map(str, shown.columns)) + " |", "|" + "---|" * len(shown.columns)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in shown.astype(object).itertuples(index=False)]
    lines += ["", *(f"![{name}]({path.name})" for name, path in images.items()), "",
              f"dashboard: `{dashboard_command(meta)}`", ""]
    return "\n".join(lines)


def _table(df: pd.DataFrame) -> str:
    return df.to_html(index=False, na_rep="", float_format=lambda x: f"{x:.4g}", border=0, classes="t")


def _plotly(study, meta: dict) -> list[tuple[str, str]]:
    """Optuna's interactive plots, labelled with the study's words; plotly.js inlined once."""
    import optuna.visualization as ov
    metric = meta["objective"]["metric"]
    params, why = plots.importance_params(study)
    figs = [("optimization history", lambda: ov.plot_optimization_history(study, target_name=metric), None),
            ("intermediate values", lambda: ov.plot_intermediate_values(study), ("round", metric)),
            ("parallel coordinate", lambda: ov.plot_parallel_coordinate(study, target_name=metric), None)]
    if params:
        figs.append(("parameter importances", lambda: ov.plot_param_importances(study, params=params,
                                                                                 target_name=metric),
                     (f"importance for {metric}", "parameter")))
    out, first = [], True
    for title, make, axes in figs:
        try:
            fig = make()
        except Exception as e:  # noqa: BLE001 — e.g. no finished trials yet
            out.append((title, f"<p>not drawn: {html.escape(str(e))}</p>"))
            continue
        fig.update_layout(title=f"{meta['study']}: {title}", height=420)
        if axes:
            fig.update_xaxes(title_text=axes[0], **({"dtick": 1} if axes[0] == "round" else {}))
            fig.update_yaxes(title_text=axes[1])
        out.append((title, fig.to_html(full_html=False, include_plotlyjs=True if first else False)))
        first = False
    if not params:
        out.append(("parameter importances", f"<p>not drawn: {html.escape(why)}</p>"))
    return out


def _overlap_section(study_dir: Path) -> str:
    from .compare import compare
    try:
        comp = compare(study_dir)
    except UserError as e:
        return f"<p>{html.escape(str(e))}</p>"
    parts = ["<p>How much the chains' recruits agree: rows and columns are trials named by their parameters.</p>"]
    for name, m in comp.matrices.items():
        parts.append(f"<h3>{html.escape(name)}</h3>" + m.to_html(na_rep="", float_format=lambda x: f"{x:.2f}",
                                                                   border=0, classes="t"))
    return "\n".join(parts)


CSS = """body{font-family:sans-serif;margin:24px;max-width:1400px} table.t{border-collapse:collapse;font-size:13px}
table.t td,table.t th{border:1px solid #ccc;padding:3px 6px;text-align:right} table.t th{background:#f0f0f0}
img{max-width:100%;border:1px solid #ddd;margin:6px 0} .wide{overflow-x:auto} h2{margin-top:32px}"""


def _html(meta, study, study_dir: Path, frame: pd.DataFrame, shown: pd.DataFrame, images: dict[str, Path]) -> str:
    obj = meta["objective"]
    states = frame["state"].value_counts().to_dict() if len(frame) else {}
    done = frame[frame["value"].notna()] if len(frame) else frame
    best = ""
    if len(done):
        i = done["value"].idxmax() if obj["direction"] == "maximize" else done["value"].idxmin()
        row = done.loc[i]
        params = ", ".join(f"{c.removeprefix('params.')}={row[c]}" for c in frame.columns if c.startswith("params."))
        best = f"<p><b>best trial {row['trial']}</b>: {obj['metric']} = {row['value']:.6g} ({params})</p>"
    core = [c for c in frame.columns if c.startswith("r") and "." in c and c.split(".", 1)[1] in CORE]
    pngs = "\n".join(f"<h3>{html.escape(name)}</h3><img alt='{name}' src='data:image/png;base64,"
                     f"{base64.b64encode(path.read_bytes()).decode()}'>" for name, path in images.items())
    interactive = "\n".join(f"<h3>{html.escape(t)}</h3>{body}" for t, body in _plotly(study, meta))
    return f"""<!DOCTYPE html><html><head><meta charset="utf-8"><title>crabsweep study {html.escape(meta['study'])}</title>
<style>{CSS}</style></head><body>
<h1>Study {html.escape(meta['study'])}</h1>
<p>objective: the last completed round's <code>{html.escape(obj['metric'])}</code> ({obj['direction']}); trials:
{html.escape(', '.join(f'{k} {v}' for k, v in states.items()))}</p>{best}
<h2>Trials</h2><div class="wide">{_table(shown)}</div>
<h2>Per-round metrics</h2><div class="wide">{_table(frame[['trial', *core]] if len(frame) else frame)}</div>
<details><summary>every column (as in report.csv)</summary><div class="wide">{_table(frame)}</div></details>
<h2>Recruit overlap</h2>{_overlap_section(study_dir)}
<h2>Plots</h2>{pngs}
<h2>Interactive (Optuna)</h2>{interactive}
<p>dashboard: <code>{html.escape(dashboard_command(meta))}</code></p>
</body></html>
"""
