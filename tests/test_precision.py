"""bf16 (weights bf16, autocast, adapter and optimizer fp32) against fp32 on a tiny chain; determinism per dtype."""

from __future__ import annotations

import pytest

from crabsweep.cli import main
from crabsweep.io import read_json

CHAIN = ["chain", "model=tiny_llama", "task=tiny", "tracker=none", "eval.max_new_tokens=4", "train.epochs=2",
         "chain.rounds=2", "k.k=4", "chain.control=last"]


def _run(tmp_path, name: str, dtype: str) -> dict:
    run = tmp_path / name
    assert main([*CHAIN, f"dtype={dtype}", f"hydra.run.dir={run}"]) == 0
    return read_json(run / "chain.json")


def _selected(chain: dict) -> list[list[tuple]]:
    return [[(x["unit"]["layer"], x["unit"]["index"]) for x in r["recruits"]["selected"]] for r in chain["rounds"]]


@pytest.fixture(scope="module")
def chains(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("precision")
    return {"fp32": _run(tmp, "fp32", "fp32"), "bf16": _run(tmp, "bf16", "bf16"), "bf16_again": _run(tmp, "bf16b", "bf16")}


def test_bf16_and_fp32_agree_within_tolerance(chains):
    a, b = chains["fp32"], chains["bf16"]
    assert (a["fingerprints"]["dtype"], b["fingerprints"]["dtype"]) == ("float32", "bfloat16")   # recorded
    for ra, rb in zip(a["rounds"], b["rounds"]):
        for key in ("init_loss", "final_loss", "heldout_loss"):
            assert rb["metrics"][key] == pytest.approx(ra["metrics"][key], rel=0.02), (ra["round"], key)
    overlap = [len(set(x) & set(y)) for x, y in zip(_selected(a)[:1], _selected(b)[:1])]
    assert overlap[0] >= 2, overlap                      # round 0's top-4 recruits mostly the same units


def test_each_dtype_is_deterministic(chains):
    a, b = chains["bf16"], chains["bf16_again"]
    assert _selected(a) == _selected(b)
    assert [r["metrics"]["final_loss"] for r in a["rounds"]] == [r["metrics"]["final_loss"] for r in b["rounds"]]
    assert a["rounds"][1]["metrics"]["final_loss"] != chains["fp32"]["rounds"][1]["metrics"]["final_loss"]  # bf16 ran
