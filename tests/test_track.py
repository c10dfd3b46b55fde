"""Tracking and reading finished work: W&B records that are complete and idempotent, reports that are the
same from any directory, `show` and `compare` (recruit overlap checked against direct computations)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from itertools import combinations
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

import crabsweep as cs
from crabsweep.cli import main
from crabsweep.errors import UserError
from crabsweep.io import read_json
from crabsweep.track.compare import jaccard, kendall, spearman
from crabsweep.track.report import run_dir_of, write_report

TINY = ["model=tiny_llama", "task=tiny", "eval.max_new_tokens=4"]
WANDB = str(Path(sys.executable).parent / "wandb")


def _inspect(run: Path) -> tuple[dict, list[dict]]:
    out = subprocess.run([WANDB, "leet", "inspect", "--json", str(run)], capture_output=True, text=True,
                         check=True).stdout
    lines = [json.loads(x) for x in out.splitlines() if x.strip()]
    meta = next(x["run"] for x in lines if x.get("type") == "run")
    return meta, [x["history"]["item"] for x in lines if x.get("type") == "history"]


def _selected(chain: dict) -> list[tuple]:
    return [(rec["round"], x["unit"]["layer"], x["unit"]["index"]) for rec in chain["rounds"]
            for x in rec["recruits"]["selected"]]


def _check_history(run_dir: Path, histories: list[list[dict]]) -> None:
    """Across all offline folders of the run (in order): every round once, one global step axis."""
    items = [h for hist in histories for h in hist]
    rounds = [h["round"] for h in items if "round" in h]
    assert rounds == [0, 1, 2]
    steps = [h["_step"] for h in items]
    assert steps == sorted(steps) and len(set(steps)) == len(steps)
    train = [h["train/step"] for h in items if "train/step" in h]
    n = sum(len(read_json(run_dir / f"round_{r}" / "record.json")["loss_curve"]) for r in range(3))
    assert train == list(range(n))                                 # never restarts per round
    losses = [h["train/loss"] for h in items if "train/loss" in h]
    want = [p["loss"] for r in range(3) for p in read_json(run_dir / f"round_{r}" / "record.json")["loss_curve"]]
    assert losses == pytest.approx(want)


def test_wandb_rerun_is_one_run_with_a_global_step_and_every_selected_unit(tmp_path):
    run_dir = tmp_path / "c"
    args = ["chain", *TINY, "tracker=wandb_offline", "chain.rounds=2", "k.k=5", "round.top=2", "train.epochs=2",
            f"hydra.run.dir={run_dir}"]
    assert main(args) == 0
    assert main(args) == 0                                         # re-running a finished chain
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    state = read_json(run_dir / "tracker.json")
    assert runs[0].name.endswith(state["id"]) and state["finished"] and state["rounds"] == [0, 1, 2]
    meta, history = _inspect(runs[0])
    config = meta["config"]["update"]
    assert not {"sweep", "ensemble", "tracker"} & set(config) and config["k"]["k"] == 5
    _check_history(run_dir, [history])
    chain = read_json(run_dir / "chain.json")
    table_path = next(h["recruits.path"] for h in history if "recruits.path" in h)
    table = json.loads((runs[0] / "files" / table_path).read_text())
    col = {c: i for i, c in enumerate(table["columns"])}
    rows = table["data"]
    chosen = [(r[col["round"]], r[col["layer"]], r[col["index"]]) for r in rows
              if r[col["selected"]] and r[col["method"]] == "lora_a_grad"]
    assert chosen == _selected(chain) and len(chosen) == 5 * 3     # all K of every round (top lists hold 2)
    tops = {(r[col["round"]], r[col["method"]], r[col["layer"]], r[col["index"]]) for r in rows if r[col["top"]]}
    assert tops == {(rec["round"], m, x["unit"]["layer"], x["unit"]["index"]) for rec in chain["rounds"]
                    for m, ranked in rec["recruits"]["top"].items() for x in ranked}
    gens = next(h["generations.path"] for h in history if "generations.path" in h)
    assert len(json.loads((runs[0] / "files" / gens).read_text())["data"]) == sum(
        len(rec["generations"]) for rec in chain["rounds"])
    # tables are staged inside the folder, not under the home directory
    wandb_file = next(runs[0].glob("*.wandb")).read_bytes()
    assert b"/.local/share/wandb" not in wandb_file and str(run_dir / "wandb" / ".staging").encode() in wandb_file


def test_wandb_killed_chain_resumes_the_same_run(tmp_path):
    run_dir = tmp_path / "c"
    args = [*TINY, "tracker=wandb_offline", "chain.rounds=2", "k.k=3", "train.epochs=12", f"hydra.run.dir={run_dir}"]
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}   # its own W&B service, killed with it
    proc = subprocess.Popen([sys.executable, "-m", "crabsweep.cli", "chain", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and 1 not in (
            read_json(run_dir / "tracker.json")["rounds"] if (run_dir / "tracker.json").exists() else []):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "chain.json").exists(), "the chain finished before it could be killed"
    time.sleep(2)                                                  # let W&B's service flush what it received
    assert main(["chain", *args]) == 0
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2
    inspected = [_inspect(r) for r in runs]
    assert len({m["run_id"] for m, _ in inspected}) == 1            # one W&B run, continued
    _check_history(run_dir, [h for _, h in inspected])


# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A 4-trial study (attribution × K), launched from its parent folder with a relative sweep.dir."""
    root = tmp_path_factory.mktemp("launch")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert main(["sweep", *TINY, "tracker=none", "sweep.pruner.name=none", "sweep.dir=multirun",
                     "sweep.study=s", "sweep.n_trials=4", "sweep.sampler.name=bruteforce", "chain.rounds=2",
                     "sweep.params={attribution: [lora_a_grad, grad_norm], k.k: [3, 6]}",
                     "sweep.overrides=['train.epochs=2','chain.control=last']"]) == 0
    finally:
        os.chdir(cwd)
    return root, root / "multirun" / "s"


def test_report_is_the_same_from_any_directory_and_numeric(study, tmp_path, monkeypatch):
    root, study_dir = study
    monkeypatch.chdir(root)
    assert main(["report", "multirun/s"]) == 0
    first = (study_dir / "report.csv").read_text()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["report", str(study_dir)]) == 0
    assert (study_dir / "report.csv").read_text() == first
    frame = pd.read_csv(study_dir / "report.csv")
    assert len(frame) == 4
    for _, row in frame.iterrows():
        chain = read_json(study_dir / row["run_dir"] / "chain.json")
        for rec in chain["rounds"]:
            for k, v in rec["metrics"].items():
                if isinstance(v, float):
                    assert row[f"r{rec['round']}.{k}"] == v, k           # full precision
        assert row["value"] == chain["rounds"][-1]["metrics"]["selectivity"]   # the default objective
    html = (study_dir / "report.html").read_text()
    assert "plotly" in html and html.count("data:image/png;base64,") >= 3 and "Recruit overlap" in html
    for png in ("objective.png", "final_gap.png", "selectivity.png", "intermediate_values.png"):
        assert (study_dir / png).exists(), png


def test_report_refuses_to_replace_a_report_when_chains_are_missing(study, tmp_path):
    import shutil
    _, study_dir = study
    copy = tmp_path / "copy"
    shutil.copytree(study_dir, copy, ignore=shutil.ignore_patterns("trial_1"))
    meta = read_json(copy / "sweep.json")
    (copy / "sweep.json").write_text(json.dumps({**meta, "storage": f"sqlite:///{copy / 'study.db'}"}))
    before = (copy / "report.csv").read_text()
    with pytest.raises(UserError, match="chain folders are not found"):
        write_report(copy)
    assert (copy / "report.csv").read_text() == before


def test_run_dir_of_reads_every_recorded_form(tmp_path, monkeypatch):
    study_dir = tmp_path / "multirun" / "s"
    (study_dir / "trial_0").mkdir(parents=True)
    other = tmp_path / "other"
    other.mkdir()
    monkeypatch.chdir(other)
    for recorded in ("trial_0", "multirun/s/trial_0", str(study_dir / "trial_0")):
        t = SimpleNamespace(user_attrs={"run_dir": recorded}, system_attrs={})
        assert run_dir_of(t, study_dir).resolve() == (study_dir / "trial_0").resolve(), recorded
        assert run_dir_of(t, Path("../multirun/s")).resolve() == (study_dir / "trial_0").resolve(), recorded


def test_show_a_chain_and_a_study(study, capsys):
    _, study_dir = study
    chain_dir = study_dir / "trial_0"
    rounds = cs.show(chain_dir)
    chain = read_json(chain_dir / "chain.json")
    assert list(rounds["round"]) == [0, 1, 2]
    assert list(rounds["final_gap"]) == [r["metrics"]["final_gap"] for r in chain["rounds"]]
    assert list(cs.show(study_dir)["trial"]) == [0, 1, 2, 3]
    assert main(["show", str(chain_dir)]) == 0
    out = capsys.readouterr().out
    assert chain["trajectory"]["class"] in out
    for rec in chain["rounds"]:
        assert f"L{rec['recruits']['selected'][0]['unit']['layer']}:{rec['recruits']['selected'][0]['unit']['index']}" in out
    assert main(["show", str(study_dir)]) == 0
    assert "lora_a_grad" in capsys.readouterr().out


def _positions(a: list, b: list) -> tuple[list, list]:
    shared = [u for u in a if u in b]
    return [a.index(u) for u in shared], [b.index(u) for u in shared]


def _pearson_of_ranks(x: list, y: list) -> float:
    """Spearman's ρ by its definition: Pearson's r of the ranks."""
    return pd.Series(x).rank().corr(pd.Series(y).rank())


def _kendall_by_inversions(x: list, y: list) -> float:
    """τ = 1 − 4·(discordant pairs)/(n(n−1)), discordant pairs counted as inversions of y sorted by x."""
    ys = [v for _, v in sorted(zip(x, y))]
    inversions = sum(1 for i in range(len(ys)) for j in range(i + 1, len(ys)) if ys[i] > ys[j])
    n = len(ys)
    return 1 - 4 * inversions / (n * (n - 1))


def test_rank_correlations_against_independent_computations():
    a = ["u1", "u2", "u3", "u4", "u5", "u6"]
    b = ["u6", "u2", "x", "u1", "u5", "y", "u3"]
    x, y = _positions(a, b)
    assert spearman(a, b) == pytest.approx(_pearson_of_ranks(x, y))
    assert kendall(a, b) == pytest.approx(_kendall_by_inversions(x, y))
    assert spearman(a, list(reversed(a))) == pytest.approx(-1) and kendall(a, a) == 1
    assert spearman(["a"], ["a", "b"]) is None and jaccard(a, b) == pytest.approx(5 / 8)


def test_compare_chains_and_a_study_matrix(study, capsys):
    _, study_dir = study
    chains = {p.name: read_json(p / "chain.json") for p in sorted(study_dir.glob("trial_*"))}
    comp = cs.compare(study_dir / "trial_0", study_dir / "trial_1")
    a, b = chains["trial_0"], chains["trial_1"]
    assert list(comp.overlap["round"]) == [0, 1, 2]
    for _, row in comp.overlap.iterrows():
        r = row["round"]
        sa = [x["unit"]["layer"] * 1000 + x["unit"]["index"] for x in a["rounds"][r]["recruits"]["selected"]]
        sb = [x["unit"]["layer"] * 1000 + x["unit"]["index"] for x in b["rounds"][r]["recruits"]["selected"]]
        assert row["jaccard"] == pytest.approx(len(set(sa) & set(sb)) / len(set(sa) | set(sb)))
        x, y = _positions(sa, sb)
        if len(x) >= 2:
            assert row["spearman"] == pytest.approx(_pearson_of_ranks(x, y))
            assert row["kendall"] == pytest.approx(_kendall_by_inversions(x, y))
    assert comp.metrics.loc[(1, "final_gap"), "trial_0"] == a["rounds"][1]["metrics"]["final_gap"]
    assert comp.trajectories.loc["trial_1", "class"] == b["trajectory"]["class"]
    assert main(["compare", str(study_dir / "trial_0"), str(study_dir / "trial_1")]) == 0
    assert "recruit overlap" in capsys.readouterr().out

    comp = cs.compare(study_dir)
    m = comp.matrices["jaccard (round 0)"]
    assert m.shape == (4, 4) and all(m.loc[n, n] == 1 for n in m.index)
    labels = {f"{c['config']['attribution']} {c['config']['k']['k']}": c for c in chains.values()}
    assert set(m.index) == set(labels)
    for p, q in combinations(m.index, 2):
        sp = {(x["unit"]["layer"], x["unit"]["index"]) for x in labels[p]["rounds"][0]["recruits"]["selected"]}
        sq = {(x["unit"]["layer"], x["unit"]["index"]) for x in labels[q]["rounds"][0]["recruits"]["selected"]}
        assert m.loc[p, q] == pytest.approx(len(sp & sq) / len(sp | sq)) == m.loc[q, p]
    assert main(["compare", str(study_dir)]) == 0
    assert "jaccard (round 0)" in capsys.readouterr().out
    with pytest.raises(UserError, match="at least two"):
        cs.compare(study_dir / "trial_0")
