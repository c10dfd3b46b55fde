"""Shared fixtures: tiny random-init models composed through the real config path."""

from __future__ import annotations

import os

import pytest
import torch

from peft.tuners.lora import LoraLayer

from crabsweep.config import compose_config
from crabsweep.core.models import load_model
from crabsweep.core.session import Session

# test sweeps run one worker unless they ask for more (the default `auto` would start one per core)
os.environ.setdefault("CRABSWEEP_SWEEP_WORKERS", "1")

torch.set_num_threads(min(2, os.cpu_count() or 1))


def tiny_cfg(*overrides: str, command: str = "round"):
    cfg, _ = compose_config(command, ["model=tiny_llama", "task=tiny", "eval.max_new_tokens=4", "tracker=none",
                                      *overrides])
    return cfg


@pytest.fixture
def make_session():
    def make(*overrides: str):
        return Session(tiny_cfg(*overrides))
    return make


def randomize_lora_b(session, std: float = 0.05, seed: int = 1) -> None:
    """Give every LoRA B a non-zero value so the LoRA path actually carries signal."""
    g = torch.Generator().manual_seed(seed)
    for m in session.model.modules():
        if isinstance(m, LoraLayer):
            w = m.lora_B["default"].weight
            w.data.copy_(torch.randn(w.shape, generator=g) * std)


def merged_base(session):
    """A freshly built copy of the base model whose weights are W + s·B·A of the session's adapter."""
    fresh = load_model(session.cfg.model, "cpu", "fp32").model
    for name, m in session.model.named_modules():
        if isinstance(m, LoraLayer):
            w = m.base_layer.weight + m.scaling["default"] * m.lora_B["default"].weight @ m.lora_A["default"].weight
            fresh.get_submodule(name.removeprefix("base_model.model.")).weight.data.copy_(w.detach())
    return fresh


def reload_adapter_loss(adapter_dir, suppressed) -> float:
    """Plain-PEFT reload of a saved adapter on a fresh tiny base; train loss with `suppressed` zeroed by hand."""
    from peft import PeftModel

    from crabsweep.core.tasks import collate, load_task
    from crabsweep.loop.train import token_losses
    cfg = tiny_cfg()
    fresh = load_model(cfg.model, "cpu", "fp32")
    model = PeftModel.from_pretrained(fresh.model, str(adapter_dir))
    task = load_task(cfg.task, fresh.tokenizer)

    def zero(idx):
        def hook(_m, args):
            x = args[0].clone()
            x[..., idx] = 0
            return (x,)
        return hook
    layers = fresh.arch.decoder_layers(model)
    handles = [fresh.arch.down_proj_of(layers[layer]).register_forward_pre_hook(zero(i)) for layer, i in suppressed]
    with torch.no_grad():
        batch = collate(task.train, fresh.tokenizer.pad_token_id)
        _, plain, _ = token_losses(model, batch, "cpu")
        n = (batch["labels"] != -100).sum()
        loss = float(plain)
    for h in handles:
        h.remove()
    return loss


# -- a tiny random dictionary for tiny_llama (width 32) ---------------------------------------------------
D, F, K = 32, 64, 8


def random_dictionary(name, layers, seed=0):
    from crabsweep.dictionary.formats import Dictionary
    from crabsweep.dictionary.sites import Site
    g = torch.Generator().manual_seed(seed)
    L = len(layers)
    w_dec = torch.randn(F, L, D, generator=g)
    w_dec = w_dec / w_dec.flatten(1).norm(dim=1)[:, None, None]
    w_enc = 3 * w_dec.permute(1, 2, 0) + 0.3 * torch.randn(L, D, F, generator=g)     # not tied: w·d ≠ 1
    return Dictionary(name, tuple(Site(x) for x in layers), w_enc.contiguous(), 0.1 * torch.randn(F, generator=g),
                      w_dec, 0.1 * torch.randn(L, D, generator=g), "topk", K)


@pytest.fixture(scope="session")
def tiny_dictionaries(tmp_path_factory) -> dict:
    """{"sae": an SAE at layer 1, "cc": a crosscoder over layers 0 and 1} of tiny_llama, as folders."""
    from crabsweep.dictionary.formats import save_dictionary
    root = tmp_path_factory.mktemp("dicts")
    return {"sae": str(save_dictionary(random_dictionary("sae", [1]), root / "sae")),
            "cc": str(save_dictionary(random_dictionary("cc", [0, 1], seed=1), root / "cc"))}
