"""Adapters behind one protocol: each trains, resets, disables, saves and reloads; masks reach every path."""

from __future__ import annotations

import pytest
import torch

from crabsweep.core.session import Session
from crabsweep.core.tasks import collate
from crabsweep.loop.round import run_round
from crabsweep.loop.train import token_losses

from .conftest import tiny_cfg

ADAPTERS = {"lora": ["train.lr=1e-2"], "full": ["attribution=grad_x_act", "train.lr=1e-3"],
            "prompt_tuning": ["attribution=grad_x_act", "train.lr=1e-1"]}


def _session(name, *extra):
    return Session(tiny_cfg(f"adapter={name}", "train.epochs=2", *ADAPTERS[name], *extra))


def _paths(session):
    """Every module that receives layer 0's down_proj input: the wrapper's base and adapter paths, or itself."""
    site = session.basis.sites(session.model)[0]
    if hasattr(site, "base_layer"):
        return {"base": site.base_layer, "lora": site.lora_A["default"]}
    return {"site": site}


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_suppressed_unit_is_exactly_zero_in_every_path(name):
    session = _session(name)
    run_round(session, [], generations=False)               # a trained adapter, so every path carries signal
    seen = {}
    # forward hooks see the inputs each module's forward actually received (after every pre-hook)
    hooks = [m.register_forward_hook(lambda m, a, out, k=k: seen.__setitem__(k, a[0].detach()))
             for k, m in _paths(session).items()]
    batch = collate(session.task.train, session.pad_id)
    with torch.no_grad():
        token_losses(session.model, batch, "cpu")
        clean = dict(seen)
        with session.intervene(session.mask([(0, 3), (0, 40)])):
            token_losses(session.model, batch, "cpu")
    for h in hooks:
        h.remove()
    v = session.adapter.n_virtual_tokens
    assert clean and all(x.shape[1] == batch["input_ids"].shape[1] + v for x in clean.values())
    for k, x in seen.items():
        assert torch.all(x[..., [3, 40]] == 0) and torch.any(clean[k][..., [3, 40]] != 0), k
        keep = [j for j in range(x.shape[-1]) if j not in (3, 40)]
        assert torch.equal(x[..., keep], clean[k][..., keep]), k


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_reset_disable_save_load(name, tmp_path):
    session = _session(name)
    batch = collate(session.task.train, session.pad_id)

    def loss():
        with torch.no_grad():
            return token_losses(session.model, batch, "cpu")[1]

    with torch.no_grad(), session.adapter.disabled():
        base = loss()
    result = run_round(session, [(1, 2)], generations=False)
    trained = loss()
    assert not torch.equal(trained, base)                      # training changed the model …
    with session.adapter.disabled():
        assert torch.equal(loss(), base)                       # … and disabled() is exactly the base model
    assert torch.equal(loss(), trained)                        # … restored on exit
    session.adapter.save(tmp_path / "a")
    again = run_round(session, [(1, 2)], generations=False)    # reset → the same seeded run
    assert again.curve == result.curve
    session.adapter.reset(7)
    assert not torch.equal(loss(), trained)
    session.adapter.load(tmp_path / "a")
    assert torch.equal(loss(), trained)
    assert all(p.dtype == torch.float32 for p in session.adapter.trainable())


def test_lora_a_grad_and_ensembles_need_lora(tmp_path, capsys):
    from crabsweep.cli import main
    assert main(["chain", "model=tiny_llama", "task=tiny", "adapter=full", "attribution=lora_a_grad",
                 f"hydra.run.dir={tmp_path / 'r'}"]) == 2
    assert "attribution=lora_a_grad needs adapter=lora" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_ensembles_refuse_adapters_that_do_not_combine(tmp_path, capsys):
    from crabsweep.cli import main
    run = tmp_path / "chain"
    assert main(["chain", "model=tiny_llama", "task=tiny", "tracker=none", "eval.max_new_tokens=2", "train.epochs=1",
                 "adapter=full", "attribution=grad_x_act", "chain.rounds=1", "k.k=2", f"hydra.run.dir={run}"]) == 0
    assert (run / "round_1" / "adapter" / "weights.safetensors").exists()
    capsys.readouterr()
    assert main(["ensemble", str(run), "tracker=none"]) == 2
    assert "ensembles combine LoRA adapters; this chain used adapter=full" in capsys.readouterr().err
