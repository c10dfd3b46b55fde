"""The names of the per-round metrics (`chain.json` rounds[i].metrics), for checks made before anything runs
(e.g. `sweep.objective.metric`). Keep in sync with loop/round.py and loop/chain.py.
"""

from __future__ import annotations

ROUND_METRICS = (
    # loop/round.py: the round's own training and evaluation
    "init_loss", "final_loss", "init_loss_weighted", "final_loss_weighted", "heldout_loss", "heldout_loss_weighted",
    "task_score", "task_score_mask_off", "n_suppressed", "steps", "train_tokens", "ig_completeness",
    # loop/chain.py: derived per round of a chain
    "delta_loss", "final_gap", "damage", "collateral", "top1_score", "layers_with_recruits",
    # behaviour-level metrics and the selective objective
    "selectivity", "behaviour_ce", "content_ce",
    # from the matched random control
    "final_gap_random", "specificity", "behaviour_ce_random", "content_ce_random", "collateral_random",
    "task_score_random",
)

# Metrics that exist only in rounds that ran their matched random control (chain.control != none).
CONTROL_METRICS = ("final_gap_random", "specificity", "selectivity", "behaviour_ce_random", "content_ce_random",
                   "collateral_random", "task_score_random")
