"""Records of the circuit commands: JSON, one PNG each, and the W&B mirror (a tracker's optional `log_sweep`)."""

from __future__ import annotations

import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .. import io  # noqa: E402
from ..errors import UserError  # noqa: E402

log = logging.getLogger(__name__)
OUTPUTS = {"discover": ("circuit.json", "units.json"), "steer": ("steer.json", "steer.png"),
           "faithfulness": ("faithfulness.json", "faithfulness.png"), "edges": ("edges.json", "edges.dot")}


def check_fresh(out_dir, job: str) -> None:
    """Refuse to write `job`'s records over those of an earlier run."""
    for name in OUTPUTS[job]:
        if out_dir is not None and (Path(out_dir) / name).exists():
            raise UserError(f"{Path(out_dir) / name} exists (an earlier run); pass a new hydra.run.dir / out_dir")


def _log(tracker, name: str, rows: list[dict], x: str, images: dict[str, Path], summary: dict) -> None:
    """Mirror a sweep to the tracker if it can (W&B: one line per row on a `<name>/<x>` axis); never fails the run."""
    fn = getattr(tracker, "log_sweep", None)
    if fn is not None:
        fn(name, rows, x, images, summary)
    if tracker is not None:
        tracker.finish(None)


def finish_steer(session, result: dict, out_dir: Path, tracker=None) -> None:
    io.write_json(out_dir / "steer.json", result)
    plot_steer(result, out_dir / "steer.png")
    rows = [{"value": r["value"]} | {f"{r['method']}/{k}": v for k, v in r.items() if k not in ("value", "method")} |
            {f"{r['method']}/random_{k}": v for k, v in (r.get("random") or {}).items()}
            for r in result["rows"] + ((result.get("caa") or {}).get("rows") or [])]
    _log(tracker, "steer", rows, "value", {"steer": out_dir / "steer.png"},
         {"units": result.get("units"), "prompt_set": result["prompt_set"]})


def finish_faithfulness(result: dict, out_dir: Path, tracker=None) -> None:
    io.write_json(out_dir / "faithfulness.json", result)
    plot_faithfulness(result, out_dir / "faithfulness.png")
    _log(tracker, "faithfulness", result["rows"], "percent", {"faithfulness": out_dir / "faithfulness.png"},
         {"f_model": result["f_model"], "f_empty": result["f_empty"]})


def plot_steer(result: dict, path: Path) -> None:
    """Behaviour vs multiplier (circuit and random twins), CAA vs α, quality, behaviour vs quality."""
    rows, caa = result["rows"], (result.get("caa") or {}).get("rows") or []
    base = result["baseline"]
    fig, ax = plt.subplots(2, 2, figsize=(12, 8.5))
    for axis, series, label in ((ax[0, 0], rows, "multiplier m (units × m)"),
                                (ax[0, 1], caa, f"CAA strength α (layer {(result.get('caa') or {}).get('layer')})")):
        if not series:
            axis.text(0.5, 0.5, "not run (steer.caa=true runs it)", ha="center", va="center", transform=axis.transAxes)
            axis.set_axis_off()
            continue
        xs = [r["value"] for r in series]
        for key, style, name in (("target_prob", "o-", "target (the set's prompts)"),
                                 ("heldout_prob", "s-", "target (held-out prompts)"),
                                 ("control_prob", "^-", "control facts")):
            if series[0].get(key) is None:
                continue
            color = axis.plot(xs, [r[key] for r in series], style, label=name)[0].get_color()
            axis.axhline(base[key], color=color, ls=":", lw=0.8)
            rnd = [r["random"][key] if r.get("random") and r["random"].get(key) is not None else None for r in series]
            if key != "heldout_prob" and any(v is not None for v in rnd):
                axis.plot(xs, rnd, style.replace("-", "--"), color=color, alpha=0.5, label=f"{name}, random sets")
        axis.set(title="behaviour (dotted: no steering)", xlabel=label, ylabel="mean next-token probability")
        axis.legend(fontsize=8)
    for series, name in ((rows, "units"), (caa, "CAA")):
        if series:
            xs = [r["value"] for r in series]
            ax[1, 0].plot(xs, [r["ce"] for r in series], "o-", label=f"{name}: CE under the unsteered model")
            ax[1, 0].plot(xs, [r["degeneracy"] for r in series], "x--", label=f"{name}: repeated 3-gram rate")
    ax[1, 0].axhline(base["ce"] or 0, color="gray", ls=":", lw=0.8, label="no steering: CE")
    ax[1, 0].set(title="quality of the steered generations", xlabel="m (units) or α (CAA)", ylabel="nats/token | rate")
    ax[1, 0].legend(fontsize=8)
    for series, name, marker in ((rows, "units m", "o-"), (caa, "CAA α", "s-")):
        pts = [(r["ce"], r["target_prob"]) for r in series if r["ce"] is not None and r["target_prob"] is not None]
        if pts:
            ax[1, 1].plot(*zip(*pts), marker, label=name)
            for (x, y), r in zip(pts, series):
                ax[1, 1].annotate(f"{r['value']:g}", (x, y), fontsize=8, xytext=(3, 3), textcoords="offset points")
    if base["ce"] is not None and base["target_prob"] is not None:
        ax[1, 1].plot([base["ce"]], [base["target_prob"]], "k*", ms=10, label="no steering")
    ax[1, 1].set(title="behaviour vs quality", xlabel="CE of the steered text (nats/token, lower = more fluent)",
                 ylabel="mean target probability")
    ax[1, 1].legend(fontsize=8)
    fig.suptitle(f"steering on '{result['prompt_set']}': {result.get('units', 0)} units, positions "
                 f"{result['positions']}" + (f", {result['suppressed']} suppressed" if result["suppressed"] else ""))
    fig.tight_layout()
    io.save_figure(fig, path, dpi=90)   # complete or absent
    plt.close(fig)


def plot_faithfulness(result: dict, path: Path) -> None:
    rows = result["rows"]
    fig, ax = plt.subplots(1, 2, figsize=(12, 4.5))
    xs = [r["percent"] for r in rows]
    ax[0].plot(xs, [r["faithfulness"] for r in rows], "o-", label="faithfulness (C kept, rest mean-ablated)")
    ax[0].plot(xs, [r["completeness"] for r in rows], "s-", label="completeness (only C ablated; lower = more complete)")
    ax[0].axhline(1, color="gray", ls=":", lw=0.8)
    ax[0].axhline(0, color="gray", ls=":", lw=0.8)
    ax[0].set_xscale("symlog", linthresh=0.2)
    ax[0].set_xlim(left=0)
    ax[0].set(title="faithfulness and completeness", xlabel=f"circuit size: % of the {result['n_ranked']} attributed units",
              ylabel="(F(·) − F(∅)) / (F(M) − F(∅))")
    ax[0].legend(fontsize=8)
    ax[1].plot([r["n_units"] for r in rows], [r["f_circuit"] for r in rows], "o-", label="F(C)")
    ax[1].plot([r["n_units"] for r in rows], [r["f_complement"] for r in rows], "s-", label="F(M \\ C)")
    ax[1].axhline(result["f_model"], color="green", ls=":", label="F(M)")
    ax[1].axhline(result["f_empty"], color="red", ls=":", label="F(∅)")
    ax[1].set_xscale("symlog", linthresh=1)
    ax[1].set_xlim(left=0)
    ax[1].set(title=f"metric F: mean {result['metric']}", xlabel="units in C", ylabel="F")
    ax[1].legend(fontsize=8)
    fig.suptitle(f"faithfulness on '{result['prompt_set']}' ({result['means']} means from "
                 f"{result['patch']} prompts, {result['granularity']})")
    fig.tight_layout()
    io.save_figure(fig, path, dpi=90)   # complete or absent
    plt.close(fig)
