"""The sweep without chains: search space, samplers, the coordination of workers, up-front checks, precedence.

Trials are told synthetic values here, so the coordination code (exact cap, distinct points, failure
budget, exhausted spaces) runs in milliseconds; tests/test_sweep.py runs real chains.
"""

from __future__ import annotations

import itertools
import random
import uuid

import optuna
import pytest
from optuna.trial import TrialState

from crabsweep.cli import main
from crabsweep.config import compose_config
from crabsweep.errors import UserError
from crabsweep.sweep.params import NoRepeatSampler, make_sampler, sampler_name, search_space, space_size, trial_cap
from crabsweep.sweep.study import compose_trial, open_study, plan_sweep
from crabsweep.sweep.workers import Worker, fail_trial, next_trial, register

TINY = ["model=tiny_llama", "task=tiny", "eval.max_new_tokens=4", "tracker=none"]


def sweep_cfg(*overrides):
    cfg, _ = compose_config("sweep", [*TINY, *overrides])
    return cfg


# --------------------------------------------------------------------------------------------------
# search space
# --------------------------------------------------------------------------------------------------
def test_nested_and_dotted_params_are_the_same_space():
    nested = search_space({"attribution": ["grad_norm"], "k": {"k": [4, 8]},
                           "train": {"lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}})
    dotted = search_space({"attribution": ["grad_norm"], "k.k": [4, 8],
                           "train.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}})
    assert nested == dotted == {
        "attribution": {"type": "categorical", "choices": ["grad_norm"]},
        "k.k": {"type": "categorical", "choices": [4, 8]},
        "train.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}
    assert search_space({"k": {}}) == {}                           # `~sweep.params.k.k` leaves an empty node
    with pytest.raises(UserError, match="sets k.k twice"):
        search_space({"k.k": [4], "k": {"k": [8]}})


@pytest.mark.parametrize("params, match", [
    ({"k.k": 8}, "give a list of choices"),
    ({"k.k": []}, "non-empty list"),
    ({"k.k": [4, 4]}, "repeat a value"),
    ({"k.k": [[4], [8]]}, "choices must be numbers"),
    ({"k.k": {"type": "int", "low": 9, "high": 2}}, "low ≤ high"),
    ({"k.k": {"type": "int", "low": 1, "high": 8, "step": 0}}, "step must be a positive"),
    ({"train.lr": {"type": "float", "low": 0, "high": 1, "log": True}}, "log=true needs low > 0"),
    ({"k.k": {"type": "integer", "low": 1, "high": 2}}, "type must be categorical, int or float"),
    ({"k.k": {"type": "int", "low": 1, "high": 2, "lo": 1}}, "unknown field"),
])
def test_bad_search_spaces_are_one_line_errors(params, match):
    with pytest.raises(UserError, match=match):
        search_space(params)


def test_space_size_counts_points():
    assert space_size(search_space({"a": [1, 2, 3], "k.k": {"type": "int", "low": 2, "high": 10, "step": 4}})) == 9
    assert space_size(search_space({"x": {"type": "float", "low": 0.0, "high": 1.0, "step": 0.25}})) == 5
    assert space_size(search_space({"x": {"type": "float", "low": 0.0, "high": 1.0}})) == float("inf")


def test_command_line_sets_or_removes_one_param_or_replaces_the_space():
    assert search_space(sweep_cfg().sweep.params) == {
        "attribution": {"type": "categorical", "choices": ["lora_a_grad", "grad_norm", "grad_x_act"]},
        "k.k": {"type": "categorical", "choices": [8, 16]}}
    assert search_space(sweep_cfg("sweep.params.k.k=[4,32]").sweep.params)["k.k"]["choices"] == [4, 32]
    assert list(search_space(sweep_cfg("~sweep.params.attribution").sweep.params)) == ["k.k"]
    assert list(search_space(sweep_cfg("~sweep.params.k.k").sweep.params)) == ["attribution"]
    assert search_space(sweep_cfg("sweep.params={k.k: [3]}").sweep.params) == {
        "k.k": {"type": "categorical", "choices": [3]}}                # replaces: attribution is gone
    added = search_space(sweep_cfg("+sweep.params.train.lr={type: float, low: 1e-4, high: 1e-2, log: true}")
                         .sweep.params)
    assert set(added) == {"attribution", "k.k", "train.lr"} and added["train.lr"]["log"] is True


# --------------------------------------------------------------------------------------------------
# samplers
# --------------------------------------------------------------------------------------------------
def test_auto_sampler_enumerates_a_small_categorical_space():
    assert sampler_name(sweep_cfg("sweep.n_trials=6").sweep, search_space(sweep_cfg().sweep.params)) == "grid"
    assert sampler_name(sweep_cfg("sweep.n_trials=5").sweep, search_space(sweep_cfg().sweep.params)) == "tpe"
    numeric = sweep_cfg("+sweep.params.train.lr={type: float, low: 1e-4, high: 1e-2}", "sweep.n_trials=100")
    assert sampler_name(numeric.sweep, search_space(numeric.sweep.params)) == "tpe"
    assert trial_cap(sweep_cfg("sweep.n_trials=10").sweep, search_space(sweep_cfg().sweep.params)) == 6
    assert trial_cap(sweep_cfg("sweep.n_trials=10", "sweep.allow_repeats=true").sweep,
                     search_space(sweep_cfg().sweep.params)) == 10
    with pytest.raises(UserError, match="grid needs a finite space"):
        make_sampler(sweep_cfg("sweep.sampler.name=grid").sweep, search_space(numeric.sweep.params))
    with pytest.raises(UserError, match="cmaes needs a numeric search space"):
        make_sampler(sweep_cfg("sweep.sampler.name=cmaes").sweep, search_space(sweep_cfg().sweep.params))


def _ask_all(samplers, space, n):
    """Round-robin asks of several samplers (workers) on one storage; synthetic values."""
    storage = optuna.storages.InMemoryStorage()
    studies = [optuna.create_study(study_name="s", storage=storage, sampler=s, load_if_exists=True) for s in samplers]
    from crabsweep.sweep.params import suggest
    points = []
    for i in range(n):
        study = studies[i % len(studies)]
        trial = study.ask()
        params = {k: suggest(trial, k, spec) for k, spec in space.items()}
        study.tell(trial, float(params.get("k.k", 0)) + random.Random(i).random())
        points.append(tuple(sorted(params.items())))
    return points


@pytest.mark.parametrize("name", ["tpe", "random"])
def test_no_sampler_repeats_a_point(name):
    space = search_space({"attribution": ["grad_norm", "grad_x_act"], "k.k": [2, 4, 8, 16]})
    every = {tuple(sorted(zip(space, p))) for p in itertools.product(*(s["choices"] for s in space.values()))}
    cfg = sweep_cfg(f"sweep.sampler.name={name}", "sweep.n_trials=8").sweep
    # one worker: all 8 points of the 8-point grid, each once
    assert sorted(_ask_all([make_sampler(cfg, space, seed=0)], space, 8)) == sorted(every)
    # two workers seeded alike (today's code) would draw alike; the wrapper still never repeats
    points = _ask_all([make_sampler(cfg, space, seed=0), make_sampler(cfg, space, seed=0)], space, 8)
    assert sorted(points) == sorted(every)
    # the bare sampler does repeat on this space (what the wrapper prevents)
    bare = _ask_all([getattr(optuna.samplers, {"tpe": "TPESampler", "random": "RandomSampler"}[name])(seed=0)],
                    space, 8)
    assert len(set(bare)) < 8


def test_repeats_allowed_when_asked():
    space = search_space({"k.k": [2, 4]})
    cfg = sweep_cfg("sweep.sampler.name=random", "sweep.allow_repeats=true").sweep
    sampler = make_sampler(cfg, space, seed=0)
    assert not isinstance(sampler, NoRepeatSampler)
    assert len(set(_ask_all([sampler], space, 6))) == 2


# --------------------------------------------------------------------------------------------------
# coordination (next_trial) on a real storage, with synthetic trials
# --------------------------------------------------------------------------------------------------
def _workers(tmp_path, n, *overrides):
    cfg = sweep_cfg(f"sweep.dir={tmp_path}", f"sweep.study=s{uuid.uuid4().hex[:6]}", *overrides)
    plan = plan_sweep(cfg, [])
    plan.study_dir.mkdir(parents=True)
    out = []
    for i in range(n):
        study = open_study(plan)
        w = Worker(study, plan.url, plan.study_dir, plan.scfg, plan.space, plan.cap, name=f"host:{i}")
        study.sampler = make_sampler(plan.scfg, plan.space, register(w))
        out.append(w)
    return out


def test_two_workers_take_distinct_points_and_stop_at_the_cap(tmp_path):
    a, b = _workers(tmp_path, 2, "sweep.sampler.name=tpe", "sweep.n_trials=4",
                    "sweep.params={attribution: [grad_norm, grad_x_act, lora_a_grad], k.k: [2, 4, 8]}")
    assert (a.serial, b.serial) == (0, 1)
    running = [next_trial(a), next_trial(b), next_trial(a), next_trial(b)]      # 4 in flight at once
    assert next_trial(a) is None                                                 # cap: wait for running ones
    points = [tuple(sorted(p.items())) for _, p in running]
    assert len(set(points)) == 4
    for (trial, _), w in zip(running, [a, b, a, b]):
        w.study.tell(trial, 1.0)
    assert next_trial(b)[0] == "done" and next_trial(a)[0] == "done"
    assert len(a.study.get_trials()) == 4


def test_a_restart_continues_with_new_points(tmp_path):
    (a,) = _workers(tmp_path, 1, "sweep.sampler.name=tpe", "sweep.n_trials=3", "sweep.params={k.k: [1,2,3,4,5,6]}")
    for _ in range(3):
        trial, _ = next_trial(a)
        a.study.tell(trial, 1.0)
    first = {t.params["k.k"] for t in a.study.get_trials()}
    b = Worker(open_study(_plan_of(a, "sweep.n_trials=6")), a.url, a.study_dir, a.scfg, a.space, 6)
    b.study.sampler = make_sampler(a.scfg, a.space, register(b))
    for _ in range(3):
        trial, _ = next_trial(b)
        b.study.tell(trial, 1.0)
    later = [t.params["k.k"] for t in b.study.get_trials()[3:]]
    assert b.serial == 1 and len(set(later)) == 3 and not set(later) & first


def _plan_of(worker, *overrides):
    cfg = sweep_cfg(f"sweep.dir={worker.study_dir.parent}", f"sweep.study={worker.scfg.study}",
                    "sweep.params={k.k: [1,2,3,4,5,6]}", *overrides)
    return plan_sweep(cfg, [])


def test_a_grid_smaller_than_n_trials_ends_when_every_point_was_tried(tmp_path):
    (w,) = _workers(tmp_path, 1, "sweep.n_trials=10", "sweep.params={k.k: [1, 2, 3]}")
    assert w.cap == 3 and isinstance(w.study.sampler, optuna.samplers.BruteForceSampler)
    trial, params = next_trial(w)
    fail_trial(w.study, trial, "boom", "error")                  # a failed point is not tried again
    for _ in range(2):
        trial, params = next_trial(w)
        w.study.tell(trial, 1.0)
    done = next_trial(w)
    assert done == ("done", "every point of the search space has been tried")
    assert sorted(t.params["k.k"] for t in w.study.get_trials()) == [1, 2, 3]


def test_failure_budget_stops_every_worker_of_this_run_only(tmp_path):
    a, b = _workers(tmp_path, 2, "sweep.max_failures=2", "sweep.sampler.name=random",
                    "sweep.params={k.k: [1,2,3,4,5,6,7,8]}", "sweep.n_trials=8")
    trial, _ = next_trial(a)
    fail_trial(a.study, trial, "worker died (stale heartbeat)", "worker died")  # not counted
    trial, _ = next_trial(a)
    fail_trial(a.study, trial, "KeyError: 'nope'", "error")
    trial, _ = next_trial(b)
    fail_trial(b.study, trial, "KeyError: 'nope'", "error")
    stop = next_trial(a)
    assert stop[0] == "stopped" and "2 trials failed (sweep.max_failures=2)" in stop[1] and "KeyError" in stop[1]
    assert next_trial(b)[0] == "stopped"                          # another worker of the same run stops too
    c = Worker(open_study(_plan_of(a, "sweep.max_failures=2", "sweep.n_trials=8")), a.url, a.study_dir,
               a.scfg, a.space, 8)
    register(c)                                                   # a later run starts afresh
    nxt = next_trial(c)
    assert nxt is not None and nxt[0] not in ("stopped", "done")


# --------------------------------------------------------------------------------------------------
# precedence and up-front checks
# --------------------------------------------------------------------------------------------------
def test_command_line_beats_sweep_overrides_and_trial_params_beat_both():
    cli = [*TINY, "chain.rounds=1", "k.k=2", "train.epochs=3"]
    cfg, _ = compose_config("sweep", cli)
    plan = plan_sweep(cfg, cli)
    tcfg = compose_trial(plan, {"k.k": 4, "attribution": "grad_norm"})
    assert tcfg.chain.rounds == 1                   # sweep.overrides has chain.rounds=2: the command line wins
    assert tcfg.train.epochs == 3 and tcfg.chain.control == "every"    # ... and the rest of sweep.overrides stays
    assert tcfg.k.k == 4 and tcfg.attribution.name == "grad_norm"      # the trial's params win over both


@pytest.mark.parametrize("overrides, match", [
    (["sweep.objective.metric=final_gapp"], "is not a per-round metric"),
    (["chain.control=none"], "needs the matched random control"),
    (["sweep.params={chain.control: [every, none]}"], "chain.control=none fails: .*needs the matched random control"),
    (["sweep.params={attribution: [grad_norm, nope]}"], "attribution=nope fails"),
    (["sweep.params={k.k: [4, abc]}"], "k.k=abc fails"),
    (["sweep.params={trian.lr: [0.001]}"], "trian.lr=0.001 fails: bad config"),
    (["sweep.sampler.name=cmaes"], "cmaes needs a numeric search space"),
    (["sweep.sampler.name=annealing"], "sampler"),
    (["sweep.pruner.name=never"], "pruner"),
    (["sweep.launcher=kubernetes"], "launcher"),
    (["sweep.storage=env"], "CRABSWEEP_STORAGE is not set"),
    (["sweep.storage=postgresql://u:hunter2@127.0.0.1:9/db"], r"cannot open sweep.storage 'postgresql://u:\*\*\*@"),
])
def test_bad_sweeps_stop_before_anything_is_written(tmp_path, capsys, monkeypatch, overrides, match):
    monkeypatch.delenv("CRABSWEEP_STORAGE", raising=False)
    assert main(["sweep", *TINY, f"sweep.dir={tmp_path / 'd'}", *overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("crabsweep: error:"), err
    import re
    assert re.search(match, err[0]) and "hunter2" not in err[0]
    assert not (tmp_path / "d").exists()


def test_a_resumed_study_keeps_its_metric(tmp_path, capsys):
    (w,) = _workers(tmp_path, 1)
    with pytest.warns(optuna.exceptions.ExperimentalWarning):
        w.study.set_metric_names(["specificity"])
    code = main(["sweep", *TINY, f"sweep.dir={tmp_path}", f"sweep.study={w.scfg.study}",
                 "sweep.objective.metric=final_gap"])
    assert code == 2 and "optimizes ['specificity']" in capsys.readouterr().err


def test_metric_names_match_a_chain_record(tmp_path):
    """The names checked before a sweep runs are exactly the metrics a chain's rounds record."""
    from crabsweep.cli import main
    from crabsweep.io import read_json
    from crabsweep.loop.metric_names import ALL_METRICS, CONTROL_METRICS, ROUND_METRICS
    run = tmp_path / "run"
    assert main(["chain", "model=tiny_llama", "task=tiny", "tracker=none", "eval.max_new_tokens=4", "train.epochs=1",
                 "chain.rounds=1", "k.k=2", "chain.control=every", f"hydra.run.dir={run}"]) == 0
    rounds = read_json(run / "chain.json")["rounds"]
    numeric = lambda m: {k for k, v in m.items() if v is None or isinstance(v, (int, float))}  # noqa: E731
    assert numeric(rounds[0]["metrics"]) <= set(ROUND_METRICS)
    assert numeric(rounds[1]["metrics"]) | {"ig_completeness"} == set(ALL_METRICS)   # IG's only with attribution=ig
    assert set(CONTROL_METRICS).isdisjoint(rounds[0]["metrics"])


def test_workers_auto_is_one_single_threaded_worker_per_core_up_to_the_cap(monkeypatch):
    from types import SimpleNamespace

    from crabsweep.sweep import launchers
    monkeypatch.setattr(launchers, "cores", lambda: 4)
    auto = SimpleNamespace(workers="auto", launcher="local")
    assert launchers.n_workers(auto, cap=6) == 4 and launchers.n_workers(auto, cap=3) == 3
    assert launchers.n_workers(auto, cap=6, device="cuda") == 1
    assert launchers.n_workers(SimpleNamespace(workers=3, launcher="local"), cap=6) == 3
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert launchers.threads_per_worker(4) == 1 and launchers.threads_per_worker(2) == 2
    assert launchers.threads_per_worker(8) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert launchers.threads_per_worker(2) == 3                    # the user's choice wins
