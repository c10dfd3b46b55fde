"""The names of the per-round metrics (`chain.json` rounds[i].metrics), for checks made before anything runs
(e.g. `sweep.objective.metric`). Kept in step with loop/round.py, loop/chain.py and loop/objective.py by
tests/test_sweep_space.py, which compares them with a chain's record.
"""

from __future__ import annotations

ROUND_METRICS = (
    # loop/round.py: the round's own training and evaluation
    "init_loss", "final_loss", "init_loss_weighted", "final_loss_weighted", "heldout_loss", "heldout_loss_weighted",
    "behaviour_ce", "content_ce", "task_score", "task_score_mask_off", "n_suppressed", "steps", "train_tokens",
    "ig_completeness",
    # loop/chain.py: derived per round of a chain
    "delta_loss", "final_gap", "damage", "collateral", "top1_score", "layers_with_recruits", "generation_similarity",
)

# loop/objective.py: exist only in rounds that ran their matched random control (chain.control != none)
CONTROL_METRICS = (
    "final_gap_random", "behaviour_ce_random", "content_ce_random", "collateral_random", "damage_random",
    "task_score_random", "heldout_loss_random", "specificity", "behaviour_gap", "behaviour_gap_random",
    "content_gap", "content_gap_random", "selectivity_total", "selectivity", "generation_similarity_random",
)

ALL_METRICS = ROUND_METRICS + CONTROL_METRICS
