"""Cache and session keys cannot miss an input: every leaf of every composed config is either in the key or on
an explicit deny-list, and what the deny-lists drop truly does not change a round (or a session)."""

from __future__ import annotations

import copy
import functools
import itertools
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from crabsweep.config import compose_config, group_options
from crabsweep.core.session import SESSION_DENY, Session
from crabsweep.errors import UserError
from crabsweep.loop.cache import ROUND_DENY, RoundCache, cached_round, round_key
from crabsweep.loop.round import run_round

TINY = ["model=tiny_llama", "task=tiny", "eval.max_new_tokens=4", "tracker=none"]
# what an option needs beside it to compose (e.g. a MoE granularity needs a MoE model)
COMPANIONS = [[], ["attribution=grad_x_act"], ["model=tiny_moe", "attribution=grad_x_act"],
              ["model.path=/nonexistent"], ["model=tiny_moe"], ["suppression.path=some-dictionary"]]


@functools.cache
def every_option_config() -> tuple:
    """One composed config per option of each config group (with the companions it needs)."""
    out = []
    for group, options in group_options().items():
        for option in options:
            for extra, prefix in itertools.product(COMPANIONS, ("", "+")):     # `+`: an optional group
                try:
                    cfg, _ = compose_config("chain", [f"{prefix}{group}={option}", *extra])
                except UserError:
                    continue
                out.append((f"{group}={option}", OmegaConf.to_container(cfg, resolve=True)))
                break
            else:
                pytest.fail(f"{group}={option} composes with none of the companions {COMPANIONS}")
    return tuple(out)


@pytest.fixture(autouse=True)
def _package_versions_once(monkeypatch):
    """round_key looks up package versions on every call; the walk calls it ~10⁴ times."""
    import crabsweep.loop.cache as cache_module
    monkeypatch.setattr(cache_module, "version", functools.cache(cache_module.version))


def leaves(node, prefix=""):
    for key, value in node.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            yield from leaves(value, f"{path}.")
        else:
            yield path, value


def perturbed(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 1.5 + 0.1
    if isinstance(value, str):
        return value + "_x"
    if isinstance(value, list):
        return [*value, value[0]] if value else ["x"]
    if isinstance(value, dict):
        return {"x": 1}
    return "x"                                                  # None


def with_leaf(plain: dict, path: str, value) -> dict:
    out = copy.deepcopy(plain)
    *parents, last = path.split(".")
    node = out
    for p in parents:
        node = node[p]
    node[last] = value
    return out


def denied(path: str, deny) -> bool:
    return any(path == d or path.startswith(f"{d}.") for d in deny)


def _stub(plain: dict):
    loaded = SimpleNamespace(fingerprint={"sha256": "f"}, dtype=torch.float32)
    return SimpleNamespace(cfg=OmegaConf.create(plain), loaded=loaded, task=SimpleNamespace(files={"t": "h"}),
                           device=torch.device("cpu"), basis=SimpleNamespace())


def test_every_leaf_is_in_the_round_key_unless_denied():
    checked = 0
    for option, plain in every_option_config():
        base = round_key(_stub(plain), [(0, 1)], 0, True)
        for path, value in leaves(plain):
            changed = round_key(_stub(with_leaf(plain, path, perturbed(value))), [(0, 1)], 0, True) != base
            assert changed != denied(path, ROUND_DENY), f"{option}: {path} {'changes' if changed else 'does not change'} the round key"
            checked += 1
    assert checked > 1000
    # and the round's own inputs
    stub = _stub(plain)
    keys = {round_key(stub, [(0, 1)], 0, True), round_key(stub, [(0, 2)], 0, True), round_key(stub, [(0, 1)], 1, True),
            round_key(stub, [(0, 1)], 0, False), round_key(stub, [], 0, True)}
    assert len(keys) == 5 and round_key(stub, [(0, 1), (0, 2)], 0, True) == round_key(stub, [(0, 2), (0, 1)], 0, True)


def test_every_leaf_is_in_the_session_key_unless_denied():
    for option, plain in every_option_config():
        base = Session.structure_key(OmegaConf.create(plain))
        for path, value in leaves(plain):
            changed = Session.structure_key(OmegaConf.create(with_leaf(plain, path, perturbed(value)))) != base
            expected = not denied(path, SESSION_DENY) or path == "train.weighted"     # the task's token weights
            assert changed == expected, f"{option}: {path} {'changes' if changed else 'does not change'} the session key"


# --------------------------------------------------------------------------------------------------
# what the deny-lists drop does not change a round
# --------------------------------------------------------------------------------------------------
def _record(result) -> dict:
    rec = result.record()
    rec.pop("timing")
    return {**rec, "scores": {m: [t.clone() for t in s] for m, s in result.scores.items()}}


def _same(a: dict, b: dict) -> None:
    assert {k: v for k, v in a.items() if k != "scores"} == {k: v for k, v in b.items() if k != "scores"}
    assert a["scores"].keys() == b["scores"].keys()
    for m in a["scores"]:
        assert all(torch.equal(x, y) for x, y in zip(a["scores"][m], b["scores"][m])), m


ROUND_DENIED_VARIANTS = [   # one or more leaves under every ROUND_DENY entry that exists in the config
    ["k.k=3", "chain.rounds=7", "chain.control=none", "chain.stop.final_gap_above=1.0"],
    ["tracker=wandb_offline", "tracker.project=other"],
    ["sweep.n_trials=99", "sweep.objective.metric=final_gap", "ensemble.weights=[1,2]"],
    ["attribution=grad_norm", "attribution.normalize=layer_zscore", "seed=5", "k=fraction"],
    ["round.suppress=[{layer: 0, index: 3}]"],
    ["circuit.prompts=caps", "discover.k=5", "steer.max_new_tokens=3", "faithfulness.means=global", "edges.targets=3",
     "dictionary.train.width=64"],
]


def test_deny_listed_leaves_do_not_change_a_round():
    base, _ = compose_config("chain", TINY)
    session = Session(base)
    reference = _record(run_round(session, [(0, 1), (1, 5)], index=1, seed=0, posthoc=False))
    covered = set()
    for variant in ROUND_DENIED_VARIANTS:
        cfg, _ = compose_config("chain", [*TINY, *variant])
        plain_a, plain_b = OmegaConf.to_container(base), OmegaConf.to_container(cfg)
        diff = {p for p, v in leaves(plain_b) if dict(leaves(plain_a)).get(p, object()) != v}
        assert diff and all(denied(p, ROUND_DENY) for p in diff), diff
        covered |= {d for d in ROUND_DENY for p in diff if denied(p, (d,))}
        session.cfg = cfg
        _same(_record(run_round(session, [(0, 1), (1, 5)], index=1, seed=0, posthoc=False)), reference)
        assert round_key(session, [(0, 1)], 0, True) == round_key(_with_cfg(session, base), [(0, 1)], 0, True)
    command, _ = compose_config("round", TINY)                   # the command that runs the round
    session.cfg = command
    _same(_record(run_round(session, [(0, 1), (1, 5)], index=1, seed=0, posthoc=False)), reference)
    covered.add("command")
    assert covered >= set(ROUND_DENY) - {"hydra", "launcher"}     # not in a resolved config


def _with_cfg(session, cfg):
    clone = copy.copy(session)
    clone.cfg = cfg
    return clone


def test_a_reused_session_runs_rounds_like_a_fresh_one():
    """What SESSION_DENY drops swaps into a live session (the sweep reuses one per structure)."""
    a, _ = compose_config("chain", TINY)
    b, _ = compose_config("chain", [*TINY, "train.lr=3e-3", "train.epochs=2", "suppression.mode=mean", "seed=3",
                                    "eval.max_new_tokens=6", "round.top=4", "attribution=grad_x_act"])
    assert Session.structure_key(a) == Session.structure_key(b)
    reused = Session(a)
    run_round(reused, [(0, 2)], seed=0, posthoc=False)            # the session has been used for config a
    reused.cfg = b
    _same(_record(run_round(reused, [(0, 2)], seed=3, posthoc=False)),
          _record(run_round(Session(b), [(0, 2)], seed=3, posthoc=False)))


# --------------------------------------------------------------------------------------------------
# post-hoc scores are cached under their own config
# --------------------------------------------------------------------------------------------------
def test_posthoc_method_reuses_a_streamed_round_and_never_stale_scores(tmp_path):
    cache = RoundCache(tmp_path / "cache")
    streamed, _ = compose_config("chain", [*TINY, "attribution=grad_x_act"])
    session = Session(streamed)
    first = cached_round(session, [(0, 1)], 1, cache, seed=0)     # trains and stores the round
    assert (cache.hits, cache.misses) == (0, 1) and "integrated_gradients" not in first.scores

    scores = {}
    for n_steps in (4, 8, 4):
        cfg, _ = compose_config("chain", [*TINY, "attribution=integrated_gradients", f"attribution.n_steps={n_steps}"])
        session.cfg = cfg
        hit = cached_round(session, [(0, 1)], 1, cache, seed=0)
        fresh = run_round(session, [(0, 1)], 1, seed=0, posthoc=True)          # no cache at all
        assert hit.timing.get("cache") == "hit"
        for m in ("integrated_gradients", "grad_x_act"):
            assert all(torch.allclose(x, y, rtol=1e-5, atol=1e-7) for x, y in zip(hit.scores[m], fresh.scores[m])), m
        assert hit.metrics["ig_completeness"] == pytest.approx(fresh.metrics["ig_completeness"], rel=1e-5)
        assert hit.recruits["integrated_gradients"] == fresh.recruits["integrated_gradients"]
        scores.setdefault(n_steps, []).append(torch.cat(hit.scores["integrated_gradients"]))
    assert not torch.equal(scores[4][0], scores[8][0])            # n_steps=8 did not reuse n_steps=4's scores
    assert torch.equal(scores[4][0], scores[4][1])                # n_steps=4 again: its own cached scores
    assert cache.misses == 1 and len(list((tmp_path / "cache").glob("*/posthoc/*"))) == 2
