"""PNG plots: one per chain (chain.png) and a study's (objective, a metric per round, Optuna's).

Every plot names its run or study in the title, labels its axes and colorbars, and puts integer ticks
on round / layer / step axes.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from .. import io  # noqa: E402

log = logging.getLogger(__name__)
MIN_TRIALS_FOR_IMPORTANCE = 5       # completed trials before parameter importances mean anything


def _integer_x(ax, values=None) -> None:
    """Integer ticks on the x axis; exactly `values`' range (e.g. the rounds drawn) when there are few."""
    values = sorted({int(v) for v in values or []})
    if values and values[-1] - values[0] <= 12:
        ax.set_xticks(range(values[0], values[-1] + 1))
        ax.set_xlim(values[0] - 0.5, values[-1] + 0.5)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _figure(*args, **kwargs):
    """A new figure in matplotlib's default style (Optuna's plots switch the global style to ggplot)."""
    with plt.style.context("default"):
        return plt.subplots(*args, **kwargs)


def _save(fig, path: Path, dpi: int = 90) -> Path:
    fig.tight_layout()
    io.save_figure(fig, path, dpi=dpi, bbox_inches="tight")   # complete or absent
    plt.close(fig)
    return path


def plot_chain(chain: dict, rounds: list[dict], sizes: list[int], path: str | Path, group_of=None) -> None:
    """`rounds`: the full round records (with loss curves); `group_of(unit json)` → its group (default: layer).
    The title names the run folder."""
    group_of = group_of or (lambda u: u["layer"])
    path = Path(path)
    fig, ax = _figure(2, 2, figsize=(12, 8))
    for rec in rounds:
        ax[0, 0].plot(range(len(rec["loss_curve"])), [p["loss"] for p in rec["loss_curve"]],
                      label=f"round {rec['round']}")
    ax[0, 0].set(title="training loss per step", xlabel="training step (within the round)", ylabel="loss (nats)")
    _integer_x(ax[0, 0])
    ax[0, 0].legend(fontsize=8)

    heat = np.zeros((len(rounds), max(len(sizes), 1)))
    for i, rec in enumerate(rounds):
        for x in rec["recruits"]["selected"]:
            g = group_of(x["unit"])
            if isinstance(g, int) and 0 <= g < heat.shape[1]:
                heat[i, g] += 1
    im = ax[0, 1].imshow(heat, aspect="auto", cmap="viridis", interpolation="nearest", vmin=0)
    what = "dictionary" if chain["config"].get("granularity") == "dictionary_feature" else "layer"
    ax[0, 1].set(title=f"selected units per {what}", xlabel=what, ylabel="round")
    ax[0, 1].set_yticks(range(len(rounds)), [str(rec["round"]) for rec in rounds])
    _integer_x(ax[0, 1], range(heat.shape[1]))          # one tick per group when there are few (e.g. 1 dictionary)
    fig.colorbar(im, ax=ax[0, 1], label="units selected", ticks=MaxNLocator(integer=True))

    idx = [rec["round"] for rec in rounds]
    top1 = [rec["metrics"].get("top1_score") for rec in rounds]
    ax[1, 0].plot(idx, [np.nan if v is None else v for v in top1], "o-")
    ax[1, 0].set(title=f"top-1 recruit score ({chain['config']['attribution']})", xlabel="round",
                 ylabel="attribution score")
    _integer_x(ax[1, 0], idx)

    def series(key):
        return [np.nan if rec["metrics"].get(key) is None else rec["metrics"][key] for rec in rounds]
    ax[1, 1].plot(idx, series("final_gap"), "o-", label="final gap")
    if any(k in rec["metrics"] for rec in rounds for k in ("final_gap_random",)):
        ax[1, 1].plot(idx, series("final_gap_random"), "s--", label="final gap, random control")
    ax[1, 1].plot(idx, series("damage"), "^:", label="damage (mask, no adapter)")
    ax[1, 1].axhline(0, color="grey", lw=0.5)
    ax[1, 1].set(title="cost of suppression", xlabel="round", ylabel="Δ loss vs round 0 / base (nats)")
    _integer_x(ax[1, 1], idx)
    ax[1, 1].legend(fontsize=8)
    run = path.parent
    study = run.parent.name if (run.parent / "sweep.json").exists() else chain["config"].get("group")
    name = f"{study}/{run.name}" if study else run.name
    fig.suptitle(f"chain {name} — trajectory: {chain['trajectory']['class']}")
    _save(fig, path)


def plot_objective(rows: list[dict], meta: dict, path: Path) -> Path | None:
    """The objective of every finished trial, grouped by its parameters."""
    done = [r for r in rows if r["value"] is not None]
    if not done:
        return None
    keys = sorted({k for r in done for k in r["params"]})
    by = [k for k in ("attribution", "k.k") if k in keys] or keys
    labels = [", ".join(f"{k}={r['params'].get(k)}" for k in by) or "(no params)" for r in done]
    order = sorted(set(labels))
    fig, ax = _figure(figsize=(max(6, 0.9 * len(order) + 3), 4.5))
    ax.scatter([order.index(lbl) for lbl in labels], [r["value"] for r in done], zorder=3)
    for r, lbl in zip(done, labels):
        ax.annotate(f"t{r['trial']}", (order.index(lbl), r["value"]), textcoords="offset points", xytext=(5, 2),
                    fontsize=7)
    ax.set_xticks(range(len(order)), order, rotation=30, ha="right")
    obj = meta["objective"]
    ax.set(title=f"study {meta['study']}: {obj['metric']} ({obj['direction']}) per trial",
           xlabel=" / ".join(by) or "trial", ylabel=f"{obj['metric']} (last round)")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_metric_per_round(rows: list[dict], metric: str, study: str, path: Path) -> Path | None:
    """One line per trial: `metric` in each completed round."""
    lines = [(r, [x.get(metric) for x in r["rounds"]]) for r in rows]
    lines = [(r, v) for r, v in lines if any(x is not None for x in v)]
    if not lines:
        return None
    fig, ax = _figure(figsize=(10, 4.5))
    for r, v in lines:
        params = ", ".join(f"{k}={p}" for k, p in sorted(r["params"].items()))
        ax.plot(range(len(v)), [np.nan if x is None else x for x in v], "o-",
                label=f"t{r['trial']} {params} ({r['state'].lower()})")
    ax.axhline(0, color="grey", lw=0.5)
    ax.set(title=f"study {study}: {metric} per round", xlabel="round", ylabel=metric)
    _integer_x(ax, range(max(len(v) for _, v in lines)))
    if len(lines) <= 20:                                   # beyond that a legend hides more than it tells
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), title="trial", title_fontsize=7)
    return _save(fig, path)


def varied_params(study) -> list[str]:
    """Parameters that took at least two values, each in at least two completed trials."""
    from collections import Counter

    from optuna.trial import TrialState
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    values: dict[str, Counter] = {}
    for t in done:
        for k, v in t.params.items():
            values.setdefault(k, Counter())[repr(v)] += 1
    return sorted(k for k, c in values.items() if sum(n >= 2 for n in c.values()) >= 2)


def importance_params(study) -> tuple[list[str], str | None]:
    """(params to rank, None) or ([], why importances are not drawn)."""
    from optuna.trial import TrialState
    n = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    varied = varied_params(study)
    if n < MIN_TRIALS_FOR_IMPORTANCE:
        return [], f"only {n} completed trial(s); importances need {MIN_TRIALS_FOR_IMPORTANCE}"
    if not varied:
        return [], "no parameter took two values, each in two or more completed trials"
    return varied, None


def _rename(fig, old: str, new: str) -> None:
    """Replace Optuna's generic label (axis labels, tick labels, colorbars) with the study's word."""
    for a in fig.axes:
        for get, put in ((a.get_xlabel, a.set_xlabel), (a.get_ylabel, a.set_ylabel)):
            if get() == old:
                put(new)
        legend = a.get_legend()
        for t in legend.get_texts() if legend else []:
            if t.get_text() == old:
                t.set_text(new)
        ticks = a.get_xticklabels()
        if any(t.get_text() == old for t in ticks):
            a.set_xticks(a.get_xticks(), [new if t.get_text() == old else t.get_text() for t in ticks])


def optuna_pngs(study, meta: dict, study_dir: Path) -> dict[str, Path]:
    """Optuna's matplotlib plots with the study's words: rounds, the objective metric."""
    from optuna.visualization import matplotlib as ovm
    metric = meta["objective"]["metric"]
    params, why = importance_params(study)
    plots = {"intermediate_values": (ovm.plot_intermediate_values, {}, "round", metric),
             "parallel_coordinate": (ovm.plot_parallel_coordinate, {}, None, None)}
    if params:
        plots["param_importances"] = (ovm.plot_param_importances, {"params": params},
                                      f"importance for {metric}", "parameter")
    else:
        log.info("parameter importances not drawn: %s", why)
    out = {}
    for name, (fn, kwargs, xlabel, ylabel) in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = fn(study, **kwargs)
        except Exception as e:  # noqa: BLE001 — e.g. no finished trials yet
            log.info("optuna %s plot skipped: %s", name, e)
            continue
        ax = ax if hasattr(ax, "figure") else ax.flat[0]
        if xlabel:
            ax.set_xlabel(xlabel)
        if ylabel:
            ax.set_ylabel(ylabel)
        if name == "intermediate_values":
            _integer_x(ax, [s for t in study.get_trials(deepcopy=False) for s in t.intermediate_values])
        ax.set_title("", loc="left")
        ax.set_title(f"study {meta['study']}: {name.replace('_', ' ')} ({metric})")
        fig = ax.figure
        _rename(fig, "Objective Value", metric)
        fig.set_size_inches(8, 5)
        out[name] = _save(fig, study_dir / f"{name}.png", dpi=80)
    return out
