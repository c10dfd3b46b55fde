"""One PNG per chain: loss curves, recruits per layer, top-1 score and final gap per round."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_chain(chain: dict, rounds: list[dict], sizes: list[int], path: str | Path, group_of=None) -> None:
    """`rounds`: the full round records (with loss curves); `group_of(unit json)` → its group (default: layer)."""
    group_of = group_of or (lambda u: u["layer"])
    fig, ax = plt.subplots(2, 2, figsize=(12, 8))
    for rec in rounds:
        ax[0, 0].plot([p["loss"] for p in rec["loss_curve"]], label=f"round {rec['round']}")
    ax[0, 0].set(title="training loss per step", xlabel="step", ylabel="loss")
    ax[0, 0].legend()

    heat = np.zeros((len(rounds), len(sizes)))
    for i, rec in enumerate(rounds):
        for x in rec["recruits"]["selected"]:
            heat[i, group_of(x["unit"])] += 1
    im = ax[0, 1].imshow(heat, aspect="auto", cmap="viridis", interpolation="nearest")
    what = "dictionary" if chain["config"].get("granularity") == "dictionary_feature" else "layer"
    ax[0, 1].set(title=f"recruits per {what}", xlabel=what, ylabel="round", yticks=range(len(rounds)))
    fig.colorbar(im, ax=ax[0, 1])

    idx = [rec["round"] for rec in rounds]
    ax[1, 0].plot(idx, [rec["metrics"]["top1_score"] for rec in rounds], "o-")
    ax[1, 0].set(title=f"top-1 score ({chain['config']['attribution']})", xlabel="round")

    ax[1, 1].plot(idx, [rec["metrics"]["final_gap"] for rec in rounds], "o-", label="final gap")
    rnd = [(rec["round"], rec["metrics"]["final_gap_random"]) for rec in rounds if "final_gap_random" in rec["metrics"]]
    if rnd:
        ax[1, 1].plot(*zip(*rnd), "s--", label="random control")
    ax[1, 1].plot(idx, [rec["metrics"]["damage"] for rec in rounds], "^:", label="damage (no adapter)")
    ax[1, 1].set(title="cost of suppression", xlabel="round", ylabel="Δ loss vs round 0 / base")
    ax[1, 1].legend()
    fig.suptitle(f"trajectory: {chain['trajectory']['class']}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
