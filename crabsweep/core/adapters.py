"""Adapters behind one protocol: what a round trains on top of the frozen base model.

    wrap(model) → model    once per session (PEFT wrapping, or nothing)
    reset(seed)            a fresh, seeded initialization (every round starts from the base model)
    trainable()            the parameters the optimizer updates
    disabled()             a scope in which the model is the untouched base model
    save(dir) / load(dir)  a round's adapter on disk (PEFT format where PEFT defines one)
    combinable             whether round adapters can be combined (ensembles: LoRA only)
    n_virtual_tokens       positions the adapter prepends to every sequence (prompt tuning)

Registered adapters (`adapter=<name>`): `lora` (PEFT LoRA, the reference), `full` (full fine-tuning of
the named modules of every decoder layer, reset from a snapshot of the base weights) and
`prompt_tuning` (PEFT soft prompt of `num_virtual_tokens` vectors). Unit hooks are placed on the
wrapped model's modules, so a PEFT-wrapped `down_proj` masks its base and LoRA paths alike.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file

from ..registry import Registry
from .device import seed_everything

ADAPTERS = Registry("adapter", key="adapter")


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Adapter:
    name = "abstract"
    combinable = False
    n_virtual_tokens = 0

    def __init__(self, cfg, loaded):
        self.cfg, self.loaded = cfg, loaded
        self.model = None

    def wrap(self, model):
        self.model = model
        return model

    def reset(self, seed: int) -> None:
        raise NotImplementedError

    def trainable(self) -> list[torch.nn.Parameter]:
        raise NotImplementedError

    @contextmanager
    def disabled(self):
        raise NotImplementedError
        yield

    def save(self, path: str | Path) -> None:
        raise NotImplementedError

    def load(self, path: str | Path) -> None:
        raise NotImplementedError

    @property
    def base_name(self) -> str:
        """What `base_model_name_or_path` says: a folder transformers can load the base model from."""
        return str(self.loaded.base_path or self.loaded.fingerprint.get("name", ""))


# --------------------------------------------------------------------------------------------------
class LoraConfig(_Config):
    name: Literal["lora"]
    r: int = Field(ge=1)
    alpha: float = Field(gt=0)
    dropout: float = Field(ge=0, lt=1)
    target_modules: list[str] = Field(min_length=1)


@ADAPTERS.register("lora", config=LoraConfig, combinable=True)
class Lora(Adapter):
    """PEFT LoRA, seeded init (A kaiming, B = 0). Fused MoE experts get none: PEFT would turn MLP targets
    into parameter-LoRA on the fused weights and bypass the expert masks; attention keeps its LoRA."""

    name = "lora"
    combinable = True

    def wrap(self, model):
        from peft import LoraConfig as PeftLora, get_peft_model
        targets = list(self.cfg.target_modules)
        if any(name.endswith(".experts") for name, _ in model.named_modules()):
            targets = [t for t in targets if t not in ("gate_proj", "up_proj", "down_proj")]
        config = PeftLora(r=int(self.cfg.r), lora_alpha=float(self.cfg.alpha), lora_dropout=float(self.cfg.dropout),
                          target_modules=targets, bias="none", task_type="CAUSAL_LM")
        self.model = get_peft_model(model, config)
        return self.model

    def reset(self, seed: int) -> None:
        from peft.tuners.lora import LoraLayer
        seed_everything(seed)
        for module in self.model.modules():
            if isinstance(module, LoraLayer):
                for name in module.lora_A:
                    module.reset_lora_parameters(name, True)

    def trainable(self):
        return [p for n, p in self.model.named_parameters() if p.requires_grad and "lora_" in n]

    def disabled(self):
        return self.model.disable_adapter()

    def save(self, path):
        self.model.save_pretrained(str(path))

    def load(self, path):
        from peft import set_peft_model_state_dict
        set_peft_model_state_dict(self.model, load_file(str(Path(path) / "adapter_model.safetensors")))


# --------------------------------------------------------------------------------------------------
class FullConfig(_Config):
    name: Literal["full"]
    target_modules: list[str] = Field(min_length=1)


@ADAPTERS.register("full", config=FullConfig)
class Full(Adapter):
    """Full fine-tuning of the modules named in `target_modules` (e.g. the MLP projections) in every decoder
    layer. Reset and `disabled()` copy a snapshot of the base weights back; saved as safetensors."""

    name = "full"

    def wrap(self, model):
        self.model = model
        layers = self.loaded.arch.decoder_layers(model)
        wanted = set(self.cfg.target_modules)
        self.params = {f"{i}.{name}": p for i, layer in enumerate(layers)
                       for name, p in layer.named_parameters() if name.split(".")[-2:-1] and
                       name.split(".")[-2] in wanted}
        if not self.params:
            from ..errors import UserError
            raise UserError(f"adapter=full: no parameters of modules {sorted(wanted)} in the decoder layers; "
                            "set adapter.target_modules to module names such as gate_proj, up_proj, down_proj")
        self.snapshot = {k: p.detach().clone() for k, p in self.params.items()}
        for p in self.params.values():
            p.requires_grad_(True)
        return model

    @torch.no_grad()
    def reset(self, seed: int) -> None:
        seed_everything(seed)
        for k, p in self.params.items():
            p.copy_(self.snapshot[k])

    def trainable(self):
        return list(self.params.values())

    @contextmanager
    def disabled(self):
        trained = {k: p.detach().clone() for k, p in self.params.items()}
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(self.snapshot[k])
        try:
            yield self.model
        finally:
            with torch.no_grad():
                for k, p in self.params.items():
                    p.copy_(trained[k])

    def save(self, path):
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: p.detach().cpu().contiguous() for k, p in self.params.items()}, str(path / "weights.safetensors"))
        (path / "crabsweep_adapter.json").write_text(json.dumps({
            "type": "full", "base_model_name_or_path": self.base_name, "target_modules": list(self.cfg.target_modules),
            "keys": "<decoder layer index>.<parameter name within the layer>"}, indent=2))

    @torch.no_grad()
    def load(self, path):
        weights = load_file(str(Path(path) / "weights.safetensors"))
        for k, p in self.params.items():
            p.copy_(weights[k])


# --------------------------------------------------------------------------------------------------
class PromptTuningConfig(_Config):
    name: Literal["prompt_tuning"]
    num_virtual_tokens: int = Field(ge=1)
    init: Literal["sample_vocab", "random"] = "sample_vocab"


@ADAPTERS.register("prompt_tuning", config=PromptTuningConfig)
class PromptTuning(Adapter):
    """PEFT prompt tuning: `num_virtual_tokens` trained input vectors prepended to every sequence. Every
    site then sees them as the first positions (`n_virtual_tokens`); logits are kept from the tail."""

    name = "prompt_tuning"

    @property
    def n_virtual_tokens(self) -> int:
        return int(self.cfg.num_virtual_tokens)

    def wrap(self, model):
        from peft import PromptTuningConfig as PeftPT, get_peft_model
        config = PeftPT(task_type="CAUSAL_LM", num_virtual_tokens=self.n_virtual_tokens, prompt_tuning_init="RANDOM")
        self.model = get_peft_model(model, config)
        return self.model

    @property
    def _embedding(self):
        return self.model.prompt_encoder["default"].embedding.weight

    @torch.no_grad()
    def reset(self, seed: int) -> None:
        seed_everything(seed)
        g = torch.Generator().manual_seed(seed)
        words = self.model.get_input_embeddings().weight
        if self.cfg.init == "sample_vocab":   # start from real token embeddings (scale matches the model's)
            idx = torch.randint(0, words.shape[0], (self.n_virtual_tokens,), generator=g)
            self._embedding.copy_(words[idx.to(words.device)].to(self._embedding.dtype))
        else:
            self._embedding.copy_(torch.randn(self._embedding.shape, generator=g).to(self._embedding))

    def trainable(self):
        return [self._embedding]

    def disabled(self):
        return self.model.disable_adapter()

    def save(self, path):
        self.model.save_pretrained(str(path))

    @torch.no_grad()
    def load(self, path):
        from peft import set_peft_model_state_dict
        set_peft_model_state_dict(self.model, load_file(str(Path(path) / "adapter_model.safetensors")))


def make_adapter(cfg, loaded) -> Adapter:
    return ADAPTERS.get(cfg.name).obj(cfg, loaded)
