"""Integrated gradients (post-hoc): (x_j − b_j)·∫₀¹ ∂L/∂x_j dt along b + t(x − b), at every group at once.

b is every unit at its suppressed value under the round's mask (the mask applied to the other units too),
so the path runs from "everything suppressed" to the round's actual state; the midpoint rule with
`n_steps` points approximates the integral. Completeness — Σ_j IG_j ≈ L(x) − L(b) — is checked and
recorded per round (`metrics.ig_completeness`); ranked by |IG|.
"""

from __future__ import annotations

import logging

import torch
from pydantic import Field

from ..core.interventions import IGPath
from ..core.observers import GradientProduct
from . import METHODS, MethodConfig

log = logging.getLogger(__name__)


class IGConfig(MethodConfig):
    n_steps: int = Field(ge=1)
    tolerance: float = Field(0.05, gt=0, allow_inf_nan=False)
    max_steps: int = Field(256, ge=1)


def _loss(session, batch):
    from ..loop.train import token_losses
    with session.precision():
        weighted, plain, _ = token_losses(session.model, batch, session.device)
    return weighted if session.cfg.train.weighted else plain


def integrated_gradients(session, mask, n_steps: int) -> tuple[list[torch.Tensor], dict]:
    """Signed IG per unit over the train examples (inside the round's `mask`), and the completeness check."""
    from ..core.tasks import collate
    basis = session.basis
    acc = GradientProduct(basis, 1.0 / n_steps)
    groups = tuple(basis.groups)
    baseline = mask.complement(basis)
    bs = int(session.cfg.eval.batch_size)
    train = session.task.train
    batches = [collate(train[i:i + bs], session.pad_id) for i in range(0, len(train), bs)]
    try:
        for k in range(n_steps):
            path = IGPath(t=(k + 0.5) / n_steps, baseline=baseline, record=acc, all_groups=groups)
            with session.intervene(path):
                for batch in batches:
                    _loss(session, batch).backward()
        ends = {}
        with torch.no_grad():
            for t in (0.0, 1.0):
                with session.intervene(IGPath(t=t, baseline=baseline, all_groups=groups)):
                    ends[t] = sum(float(_loss(session, b)) for b in batches)
    finally:
        session.model.zero_grad(set_to_none=True)
    total = float(sum(t.sum() for t in acc.totals))
    gap = ends[1.0] - ends[0.0]
    check = {"sum_ig": total, "loss_actual": ends[1.0], "loss_baseline": ends[0.0],
             "ratio": total / gap if gap else None, "n_steps": n_steps}
    return [t.float() for t in acc.totals], check


@METHODS.register("integrated_gradients", config=IGConfig, kind="posthoc",
                  granularities=("mlp_neuron", "attention_head", "residual_dim"), adapters=None)
def run(session, acfg, mask):
    """IG with `n_steps`, doubled until completeness is within `tolerance` (at most `max_steps`)."""
    n, tol, cap = int(acfg.n_steps), float(acfg.get("tolerance", 0.05)), int(acfg.get("max_steps", 256))
    signed, check = integrated_gradients(session, mask, n)
    error = lambda c: abs(c["ratio"] - 1) if c["ratio"] is not None else 0.0  # noqa: E731
    while error(check) > tol and 2 * n <= cap:
        log.info("integrated gradients completeness %.3f off by more than %.0f%%; refining to %d steps",
                 check["ratio"], 100 * tol, 2 * n)
        finer_signed, finer = integrated_gradients(session, mask, 2 * n)
        if error(finer) > 0.8 * error(check):     # not converging (e.g. nested sites): keep the cheaper one
            break
        n, signed, check = 2 * n, finer_signed, finer
    if check["ratio"] is not None and abs(check["ratio"] - 1) > tol:
        log.warning("integrated gradients completeness %.3f is off by more than %.0f%% at %d steps; raise "
                    "attribution.max_steps", check["ratio"], 100 * tol, n)
    return ({"integrated_gradients": [t.abs() for t in signed], "integrated_gradients_signed": signed},
            {"ig_completeness": check})
