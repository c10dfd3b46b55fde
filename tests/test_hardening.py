"""Hardening beyond the bad-input table (issue 14): a diverging round is recorded as failed and a resume
finishes the chain; records stay strict JSON with a NaN metric; one chain process per folder; a resume
removes what a killed run left half-made; plots are complete or absent; ensembles never overwrite."""

from __future__ import annotations

import inspect
import json
import re
import subprocess
import sys
import time

import matplotlib.pyplot as plt
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from omegaconf import OmegaConf

import crabsweep.loop.round as round_mod
from crabsweep.cli import main

CHAIN = ["model=tiny_llama", "task=tiny", "eval.max_new_tokens=4", "tracker=none", "train.epochs=2", "train.lr=1e-2",
         "k.k=2", "chain.rounds=2", "chain.control=every"]


def strict_json(path):
    """The file parsed as strict JSON: a bare NaN / Infinity fails the test."""
    def refuse(token):
        pytest.fail(f"{path} holds a bare {token} (not strict JSON)")
    return json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)


def one_error_line(err: str) -> str:
    lines = [x for x in err.splitlines() if x.strip() and not re.match(r"\d\d:\d\d:\d\d INFO ", x)]
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


def test_a_diverging_round_is_recorded_as_failed_and_a_resume_finishes_the_chain(tmp_path, monkeypatch, capsys):
    real = round_mod.train

    def lr_explodes_in_round_1(session, examples, tcfg, seed, on_step_end=None, desc="train"):
        if desc == "round 1":
            tcfg = OmegaConf.create({**OmegaConf.to_container(tcfg), "lr": 1e30})
        return real(session, examples, tcfg, seed, on_step_end=on_step_end, desc=desc)

    monkeypatch.setattr(round_mod, "train", lr_explodes_in_round_1)
    run = tmp_path / "run"
    assert main(["chain", *CHAIN, f"hydra.run.dir={run}"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert re.search(r"the training loss is (nan|inf) at step \d+ \(epoch \d, lr [\d.]+e\+(29|30)\); lower train\.lr "
                     r"\(now 1e\+30\)", line), line                      # the step and the scheduled lr
    failed = strict_json(run / "round_1.failed.json")
    assert failed["round"] == 1 and failed["part"] == "round" and line.endswith(failed["error"].split(": ", 1)[1])
    assert len(failed["suppressed"]) == 2                                # round 0's top-2
    # the failure does not look complete: round 0 is, round 1 and the chain are not
    assert (run / "round_0" / "record.json").exists()
    assert not (run / "round_1").exists() and not (run / "chain.json").exists()
    assert not list(run.glob(".round_*"))                                 # no half-made round folder either

    monkeypatch.setattr(round_mod, "train", real)                         # the cause is fixed: resume
    assert main(["chain", *CHAIN, f"hydra.run.dir={run}"]) == 0
    assert not (run / "round_1.failed.json").exists()                     # superseded by the complete round
    chain = strict_json(run / "chain.json")
    assert [r["round"] for r in chain["rounds"]] == [0, 1, 2]
    # and the same chain run in one go gives the same rounds (the failure changed nothing it kept)
    whole = tmp_path / "whole"
    assert main(["chain", *CHAIN, f"hydra.run.dir={whole}"]) == 0
    for r in range(3):
        a, b = strict_json(run / f"round_{r}" / "record.json"), strict_json(whole / f"round_{r}" / "record.json")
        assert a["loss_curve"] == b["loss_curve"] and a["recruits"] == b["recruits"]


def test_records_are_strict_json_when_a_metric_is_nan(tmp_path, monkeypatch):
    real = round_mod.eval_loss

    def nan_on_heldout(session, examples, *args, **kwargs):
        out = real(session, examples, *args, **kwargs)
        if examples is session.task.heldout:
            out = {**out, "plain": float("nan"), "weighted": float("inf"),
                   "per_sample": {k: float("-inf") for k in out["per_sample"]}}
        return out

    monkeypatch.setattr(round_mod, "eval_loss", nan_on_heldout)
    run = tmp_path / "run"
    assert main(["chain", *CHAIN, f"hydra.run.dir={run}"]) == 0
    files = sorted(run.rglob("*.json"))
    assert len(files) >= 8
    for path in files:
        strict_json(path)
    for rec in strict_json(run / "chain.json")["rounds"]:
        assert rec["metrics"]["heldout_loss"] is None and rec["metrics"]["heldout_loss_weighted"] is None
        assert set(rec["metrics"]["heldout_loss_per_sample"].values()) == {None}


def test_a_second_chain_process_on_the_same_folder_is_refused(tmp_path):
    run = tmp_path / "run"
    argv = [sys.executable, "-m", "crabsweep.cli", "chain", *CHAIN, "chain.rounds=3", f"hydra.run.dir={run}"]
    first = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not (run / "crabsweep.log").exists():       # written once the first process holds the lock
            assert first.poll() is None and time.time() < deadline, first.communicate()
            time.sleep(0.1)
        second = subprocess.run(argv, capture_output=True, text=True, timeout=300)
        out, err = first.communicate(timeout=900)
    finally:
        first.kill()
    assert second.returncode == 2
    assert "another crabsweep process is working in" in one_error_line(second.stderr)
    assert first.returncode == 0, err
    assert [r["round"] for r in strict_json(run / "chain.json")["rounds"]] == [0, 1, 2, 3]


def test_a_resume_removes_what_a_killed_run_left_half_made(tmp_path):
    run = tmp_path / "run"
    assert main(["chain", *CHAIN, f"hydra.run.dir={run}"]) == 0
    records = {p: p.read_bytes() for p in run.glob("round_*/**/record.json")}
    (run / ".round_3.tmp-k1ll3d").mkdir()                                  # io.staged_dir's temp folders
    (run / ".round_3.tmp-k1ll3d" / "scores.safetensors").write_bytes(b"partial")
    (run / "round_1" / ".control.tmp-k1ll3d").mkdir()
    leftovers = [run / ".round_3.tmp-k1ll3d", run / "round_1" / ".control.tmp-k1ll3d"]
    for path in (run / ".chain.json.tmp4242", run / ".hydra" / ".config.yaml.tmp4242",   # io.write_*'s temp files
                 run / "round_0" / ".record.json.tmp4242", run / ".units.json.tmp4242"):
        path.write_text("{")
        leftovers.append(path)
    assert main(["chain", *CHAIN, f"hydra.run.dir={run}"]) == 0
    assert [p for p in leftovers if p.exists()] == []
    assert {p: p.read_bytes() for p in run.glob("round_*/**/record.json")} == records
    assert sorted(p.name for p in run.iterdir() if ".tmp" in p.name) == []


def test_a_plot_is_complete_or_absent(tmp_path, monkeypatch):
    from crabsweep.track.plots import plot_chain
    run = tmp_path / "run"
    assert main(["chain", *CHAIN, "chain.control=none", f"hydra.run.dir={run}"]) == 0
    png = run / "chain.png"
    good = png.read_bytes()
    assert good.startswith(b"\x89PNG") and len(good) > 10_000

    real_print_png = FigureCanvasAgg.print_png

    def disk_full(self, filename_or_obj, **kwargs):                              # half the image, then ENOSPC
        if any(f.function == "_get_renderer" for f in inspect.stack()[:6]):       # matplotlib's layout dry run
            return real_print_png(self, filename_or_obj, **{k: v for k, v in kwargs.items()
                                                            if k in ("metadata", "pil_kwargs")})
        if isinstance(filename_or_obj, (str, bytes)) or hasattr(filename_or_obj, "__fspath__"):
            with open(filename_or_obj, "wb") as f:
                f.write(b"\x89PNG half")
        else:
            filename_or_obj.write(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(FigureCanvasAgg, "print_png", disk_full)
    chain = strict_json(run / "chain.json")
    rounds = [strict_json(run / f"round_{r}" / "record.json") for r in range(3)]
    with pytest.raises(OSError):
        plot_chain(chain, rounds, [64, 64], png)
    plt.close("all")
    assert png.read_bytes() == good                          # the previous plot is untouched
    assert [p.name for p in run.iterdir() if p.name.startswith(".chain.png")] == []


def test_a_second_ensemble_never_overwrites_the_first(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["chain", *CHAIN, "chain.control=none", "chain.rounds=1", f"hydra.run.dir={run}"]) == 0
    ens = ["ensemble", str(run), "model=tiny_llama", "task=tiny", "tracker=none", "ensemble.max_new_tokens=2"]
    assert main([*ens, "ensemble.weights=[1,0]"]) == 0
    first = {p.relative_to(run): p.read_bytes() for p in (run / "ensemble").rglob("*") if p.is_file()}
    assert strict_json(run / "ensemble" / "summary.json")["weights"] == [1.0, 0.0]
    capsys.readouterr()
    assert main([*ens, "ensemble.weights=[0,1]"]) == 0
    assert f"records: {run / 'ensemble-1'}" in capsys.readouterr().out
    assert strict_json(run / "ensemble-1" / "summary.json")["weights"] == [0.0, 1.0]
    again = {p.relative_to(run): p.read_bytes() for p in (run / "ensemble").rglob("*") if p.is_file()}
    assert again == first


def test_the_api_never_writes_into_someone_elses_folder(tmp_path, make_session):
    import crabsweep as cs
    mine = tmp_path / "project"
    mine.mkdir()
    (mine / "units.json").write_text("my own unit list")           # a name a chain would write
    with pytest.raises(cs.UserError, match="already holds files; pass a new or empty folder"):
        cs.run_chain(make_session("chain.rounds=0", "chain.control=none"), mine)
    assert [p.name for p in mine.iterdir()] == ["units.json"] and (mine / "units.json").read_text() == "my own unit list"
