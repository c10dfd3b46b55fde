"""Sparse dictionaries on disk: SAELens folders, sparsify folders, crabsweep crosscoder folders.

Every dictionary is held the same way — a crosscoder over L sites (an SAE is L = 1), fp32:

    W_enc [L, d, F]   b_enc [F]   W_dec [F, L, d]   b_dec [L, d]   (+ threshold [F] for JumpReLU)
    pre(x)  = Σ_l (x_l − b_dec_l·[apply_b_dec_to_input]) @ W_enc[l] + b_enc        x: [..., L, d]
    f(x)    = relu(pre) | TopK-then-ReLU(pre, k) | relu(pre)·(pre > threshold)
    x̂(f)    = f @ W_dec + b_dec                                                     [..., L, d]

Readers (`load_dictionary(path)`):
  SAELens   cfg.json + sae_weights.safetensors; architectures standard (ReLU), topk, jumprelu; the v6
            layout (`metadata` sub-dict, `metadata.sae_lens_version` ≥ 6) and the pre-6 flat layout
            (hook_name/hook_point, activation_fn_str "topk" + activation_fn_kwargs.k, scaling_factor
            folded into W_dec); `rescale_acts_by_decoder_norm` honoured; unknown cfg keys ignored,
            unknown tensors refused. Transcoders, gated SAEs and input normalisation are refused.
  sparsify  cfg.json + sae.safetensors (encoder.weight [F, d], encoder.bias, W_dec, b_dec), TopK;
            the site is the folder name (`layers.6` = output of layer 6).
  crosscoder  cfg.json with architecture "crosscoder" + sae_weights.safetensors holding the tensors
            above with their L axis; cfg keys d_in, d_sae, n_layers, hook_names (one per slot, in
            order), activation (relu | topk | jumprelu), k, apply_b_dec_to_input, dtype, metadata.
Writers: `save_dictionary(dic, folder)` — SAELens v6 for L = 1, the crosscoder layout otherwise.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import io
from ..errors import UserError
from .sites import Site, parse_site

log = logging.getLogger(__name__)

ACTIVATIONS = ("relu", "topk", "jumprelu")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
SAELENS_VERSION = "6.18.0"          # what our SAELens-format folders claim to be (the v6 layout)


@dataclass
class Dictionary:
    name: str
    sites: tuple[Site, ...]
    W_enc: torch.Tensor
    b_enc: torch.Tensor
    W_dec: torch.Tensor
    b_dec: torch.Tensor
    activation: str = "topk"
    k: int | None = None
    threshold: torch.Tensor | None = None
    apply_b_dec_to_input: bool = True
    rescale: torch.Tensor | None = None         # TopK `rescale_acts_by_decoder_norm`: ‖W_dec[i]‖
    source: str = ""
    metadata: dict = field(default_factory=dict)

    def __post_init__(self):
        L, d, F = self.W_enc.shape
        shapes = {"b_enc": (self.b_enc, (F,)), "W_dec": (self.W_dec, (F, L, d)), "b_dec": (self.b_dec, (L, d))}
        if self.threshold is not None:
            shapes["threshold"] = (self.threshold, (F,))
        for name, (t, shape) in shapes.items():
            if tuple(t.shape) != shape:
                raise UserError(f"dictionary {self.source or self.name}: {name} has shape {tuple(t.shape)}, expected "
                                f"{shape} for W_enc {tuple(self.W_enc.shape)}; the folder is inconsistent")
        if len(self.sites) != L:
            raise UserError(f"dictionary {self.source or self.name}: {len(self.sites)} hook names for {L} layers")
        if self.activation not in ACTIVATIONS:
            raise UserError(f"dictionary {self.source or self.name}: activation '{self.activation}' is not one of "
                            f"{', '.join(ACTIVATIONS)}")
        if self.activation == "topk" and not (isinstance(self.k, int) and 0 < self.k <= F):
            raise UserError(f"dictionary {self.source or self.name}: TopK needs 0 < k ≤ {F}, got k={self.k}")
        if self.activation == "jumprelu" and self.threshold is None:
            raise UserError(f"dictionary {self.source or self.name}: JumpReLU needs a threshold tensor")

    # -- shape facts --------------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d(self) -> int:
        return self.W_enc.shape[1]

    @property
    def n_features(self) -> int:
        return self.W_enc.shape[2]

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted({s.layer for s in self.sites}))

    def to(self, device) -> "Dictionary":
        for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold", "rescale"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.to(device))
        return self

    # -- maths --------------------------------------------------------------------------------------
    def pre(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder pre-activations [..., F] of x [..., L, d]."""
        x = x.float()
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        return torch.einsum("...ld,ldf->...f", x, self.W_enc) + self.b_enc

    def act(self, pre: torch.Tensor) -> torch.Tensor:
        """The activation function applied to pre-activations."""
        if self.activation == "relu":
            return pre.relu()
        if self.activation == "jumprelu":
            return pre.relu() * (pre > self.threshold)
        scaled = pre * self.rescale if self.rescale is not None else pre
        vals, idx = scaled.topk(self.k, dim=-1)
        f = torch.zeros_like(scaled).scatter(-1, idx, vals.relu())
        return f / self.rescale if self.rescale is not None else f

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.pre(x))

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return torch.einsum("...f,fld->...ld", f.float(), self.W_dec) + self.b_dec

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"W_enc": self.W_enc, "b_enc": self.b_enc, "W_dec": self.W_dec, "b_dec": self.b_dec}
        if self.threshold is not None:
            out["threshold"] = self.threshold
        return out


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------
def _read_tensors(path: Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable safetensors file ({type(e).__name__}); re-save the dictionary") from e
    return {k: (v.to(dtype) if dtype is not None else v).float() for k, v in state.items()}


def _expect(path: Path, state: dict, required: set[str], optional: set[str] = frozenset()) -> None:
    missing, extra = required - set(state), set(state) - required - set(optional)
    if missing or extra:
        raise UserError(f"{path}: tensors {sorted(state)} do not match the format (missing {sorted(missing)}, "
                        f"unexpected {sorted(extra)}); is this the right kind of folder?")


def _site(name, path: Path) -> Site:
    try:
        return parse_site(name)
    except ValueError as e:
        raise UserError(f"{path}: {e}") from None


def _is_v6(cfg: dict) -> bool:
    version = cfg.get("sae_lens_version") or (cfg.get("metadata") or {}).get("sae_lens_version")
    try:
        return version is not None and int(str(version).split(".")[0]) >= 6
    except ValueError:
        return False


def _saelens(folder: Path, cfg: dict, name: str) -> Dictionary:
    """SAELens v6 or pre-6 folder (see dictionary_formats.md §1: handle_pre_6_0_config)."""
    meta = dict(cfg.get("metadata") or {}) if _is_v6(cfg) else {}
    if not _is_v6(cfg):                       # pre-6.0 flat layout
        cfg = {{"hook_point": "hook_name", "activation_fn_str": "activation_fn"}.get(k, k): v for k, v in cfg.items()}
        cfg.setdefault("architecture", "standard")
        if cfg.get("activation_fn") == "topk" and (cfg.get("activation_fn_kwargs") or {}).get("k") is not None:
            cfg["architecture"], cfg["k"] = "topk", cfg["activation_fn_kwargs"]["k"]
        elif cfg.get("activation_fn") not in (None, "relu", "topk"):
            raise UserError(f"{folder}: activation_fn '{cfg['activation_fn']}' is not supported (relu, topk)")
        if isinstance(cfg.get("normalize_activations"), bool):
            cfg["normalize_activations"] = "expected_average_only_in" if cfg["normalize_activations"] else "none"
        meta = {k: cfg.get(k) for k in ("model_name", "hook_name", "hook_head_index", "dataset_path")}
    arch = cfg.get("architecture", "standard")
    if arch not in ("standard", "topk", "jumprelu"):
        raise UserError(f"{folder}: SAELens architecture '{arch}' is not supported (standard, topk, jumprelu SAEs; "
                        "crosscoders as architecture 'crosscoder')")
    norm = cfg.get("normalize_activations") or "none"
    if norm == "expected_average_only_in":
        log.warning("%s: normalize_activations=expected_average_only_in is read as 'none' (as SAELens' "
                    "load_from_disk does); fold the scaling factor into the weights if it is not 1", folder)
    elif norm != "none":
        raise UserError(f"{folder}: normalize_activations='{norm}' is not supported; fold it into the weights")
    if (cfg.get("reshape_activations") or "none") != "none" or meta.get("hook_head_index") is not None:
        raise UserError(f"{folder}: per-head (hook_z) SAEs are not supported")
    hook_name = meta.get("hook_name") or cfg.get("hook_name")
    if not hook_name:
        raise UserError(f"{folder}/cfg.json names no hook (metadata.hook_name); add it")
    site = _site(hook_name, folder)
    dtype = _DTYPES.get(str(cfg.get("dtype", "float32")).replace("torch.", ""))
    state = _read_tensors(folder / "sae_weights.safetensors", dtype)
    scaling = state.pop("scaling_factor", None)
    _expect(folder / "sae_weights.safetensors", state, {"W_enc", "b_enc", "W_dec", "b_dec"},
            {"threshold"} if arch == "jumprelu" else set())
    W_dec = state["W_dec"] if scaling is None else state["W_dec"] * scaling[:, None]   # (f·s) @ W = f @ (s·W)
    rescale = None
    if arch == "topk" and cfg.get("rescale_acts_by_decoder_norm"):
        rescale = W_dec.norm(dim=-1)
    if arch == "jumprelu" and "threshold" not in state:
        raise UserError(f"{folder}: a jumprelu SAE needs a 'threshold' tensor")
    d_in, d_sae = state["W_enc"].shape if state["W_enc"].dim() == 2 else (None, None)
    if d_in is None or (cfg.get("d_in"), cfg.get("d_sae")) not in ((d_in, d_sae), (None, None)):
        raise UserError(f"{folder}: W_enc {tuple(state['W_enc'].shape)} does not match cfg d_in={cfg.get('d_in')}, "
                        f"d_sae={cfg.get('d_sae')}")
    return Dictionary(name, (site,), state["W_enc"][None], state["b_enc"], W_dec[:, None], state["b_dec"][None],
                      {"standard": "relu"}.get(arch, arch), cfg.get("k"), state.get("threshold"),
                      bool(cfg.get("apply_b_dec_to_input", True)), rescale, str(folder), meta)


def _crosscoder(folder: Path, cfg: dict, name: str) -> Dictionary:
    hooks = cfg.get("hook_names")
    if not isinstance(hooks, list) or not hooks:
        raise UserError(f"{folder}/cfg.json: a crosscoder needs hook_names (one per layer slot)")
    dtype = _DTYPES.get(str(cfg.get("dtype", "float32")).replace("torch.", ""))
    act = cfg.get("activation", "relu")
    state = _read_tensors(folder / "sae_weights.safetensors", dtype)
    _expect(folder / "sae_weights.safetensors", state, {"W_enc", "b_enc", "W_dec", "b_dec"},
            {"threshold"} if act == "jumprelu" else set())
    if state["W_enc"].dim() != 3 or cfg.get("n_layers", len(hooks)) != len(hooks):
        raise UserError(f"{folder}: a crosscoder's W_enc must be [n_layers, d_in, d_sae], got "
                        f"{tuple(state['W_enc'].shape)} for {len(hooks)} hook names")
    return Dictionary(name, tuple(_site(h, folder) for h in hooks), state["W_enc"], state["b_enc"], state["W_dec"],
                      state["b_dec"], act, cfg.get("k"), state.get("threshold"),
                      bool(cfg.get("apply_b_dec_to_input", False)), None, str(folder), dict(cfg.get("metadata") or {}))


def _sparsify(folder: Path, cfg: dict, name: str) -> Dictionary:
    if cfg.get("transcode") or cfg.get("skip_connection"):
        raise UserError(f"{folder}: sparsify transcoders / skip connections are not supported (SAEs only)")
    if cfg.get("activation", "topk") != "topk":
        raise UserError(f"{folder}: sparsify activation '{cfg.get('activation')}' is not supported (topk)")
    state = _read_tensors(folder / "sae.safetensors")
    _expect(folder / "sae.safetensors", state, {"encoder.weight", "encoder.bias", "W_dec", "b_dec"})
    site = _site(folder.name, folder)
    return Dictionary(name, (site,), state["encoder.weight"].T.contiguous()[None], state["encoder.bias"],
                      state["W_dec"][:, None], state["b_dec"][None], "topk", cfg.get("k"), None, True, None,
                      str(folder), {"format": "sparsify"})


def load_dictionary(path: str | Path, name: str | None = None) -> Dictionary:
    """A dictionary folder (SAELens, sparsify or crosscoder) → Dictionary (fp32, CPU)."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise UserError(f"dictionary folder '{folder}' does not exist; train one with `crabsweep dictionary train` "
                        "or pass the folder of a SAELens / sparsify / crosscoder dictionary")
    if not (folder / "cfg.json").is_file():
        subs = sorted(p.name for p in folder.iterdir() if (p / "cfg.json").is_file())
        hint = f" (it holds {', '.join(subs[:6])}: pass one of them)" if subs else ""
        raise UserError(f"'{folder}' has no cfg.json{hint}; pass a dictionary folder")
    cfg = io.read_json(folder / "cfg.json")
    if not isinstance(cfg, dict):
        raise UserError(f"{folder}/cfg.json is not a JSON object")
    name = name or folder.name
    if cfg.get("architecture") == "crosscoder":
        return _crosscoder(folder, cfg, name)
    if (folder / "sae_weights.safetensors").is_file():
        return _saelens(folder, cfg, name)
    if (folder / "sae.safetensors").is_file():
        return _sparsify(folder, cfg, name)
    raise UserError(f"'{folder}' holds neither sae_weights.safetensors (SAELens / crosscoder) nor sae.safetensors "
                    "(sparsify)")


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------
def save_dictionary(dic: Dictionary, folder: str | Path, metadata: dict | None = None,
                    log_sparsity: torch.Tensor | None = None, extra: dict | None = None) -> Path:
    """Write `dic` into a new folder (SAELens v6 layout for one site, the crosscoder layout otherwise);
    `extra` = {file name: JSON value} written alongside (e.g. training.json)."""
    meta = {"sae_lens_version": SAELENS_VERSION, "sae_lens_training_version": SAELENS_VERSION,
            "model_class_name": "AutoModelForCausalLM", "hook_head_index": None, "prepend_bos": True,
            **(metadata or {})}
    t = {k: v.detach().float().contiguous().cpu() for k, v in dic.tensors().items()}
    arch = {"relu": "standard"}.get(dic.activation, dic.activation)
    common = {"d_in": dic.d, "d_sae": dic.n_features, "dtype": "float32", "device": "cpu",
              "apply_b_dec_to_input": dic.apply_b_dec_to_input}
    if dic.n_layers == 1:
        cfg = {**common, "normalize_activations": "none", "reshape_activations": "none", "architecture": arch,
               "metadata": {**meta, "hook_name": dic.sites[0].hf_name}}
        if dic.activation == "topk":
            cfg.update(k=dic.k, rescale_acts_by_decoder_norm=False)
        t.update(W_enc=t["W_enc"][0].contiguous(), W_dec=t["W_dec"][:, 0].contiguous(), b_dec=t["b_dec"][0].contiguous())
    else:
        cfg = {**common, "architecture": "crosscoder", "n_layers": dic.n_layers, "activation": dic.activation,
               "k": dic.k, "hook_names": [s.hf_name for s in dic.sites], "metadata": meta}
    folder = Path(folder)
    with io.staged_dir(folder) as tmp:
        io.write_tensors(tmp / "sae_weights.safetensors", t)
        if log_sparsity is not None:
            io.write_tensors(tmp / "sparsity.safetensors", {"sparsity": log_sparsity.float().contiguous()})
        for fname, value in (extra or {}).items():
            io.write_json(tmp / fname, value)
        io.write_text(tmp / "cfg.json", json.dumps(cfg, indent=2))
    return folder
