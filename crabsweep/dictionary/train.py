"""`crabsweep dictionary train`: a small TopK SAE (one layer) or crosscoder (several) on the model's own
activations, trained on CPU in minutes, evaluated, saved in the SAELens / crosscoder format.

The recipe (notes: dictionary_formats.md §5; Gao et al. 2024, sparsify):
  - per-layer input scale s_l = √d / mean‖x_l‖, folded into the weights at the end (the saved dictionary
    takes raw activations); b_dec starts at the mean, W_dec at random unit-norm rows (over all layers),
    W_enc = W_decᵀ (tied init), b_enc = 0; encode x − b_dec;
  - loss = FVU + α_aux·min(n_dead/k_aux, 1)·AuxK (the top k_aux = L·d/2 dead latents regress the
    residual); Adam(0.9, 0.999), lr 4·2e-4·√(2¹⁴/F) unless given, linear warm-up, linear decay over the
    last 20 %; decoder-gradient component along each row removed, rows renormalised every step;
    a latent is dead after one epoch of tokens without firing.
Reported (`training.json` in the folder): FVU on held-out text (Σ‖x − x̂‖² / Σ‖x − x̄‖², overall and
per layer), L0, dead fraction (never firing on train ∪ held-out), and per layer the cross-entropy loss
recovered (CE_zero − CE_spliced) / (CE_zero − CE_clean) with the raw ΔCE = CE_spliced − CE_clean, where
the layer's activation is replaced by the reconstruction (resp. zeros) at every token but the first.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..core.models import cache_dir
from ..errors import UserError
from . import sites
from .corpus import activations, corpus, describe, split
from .formats import Dictionary, save_dictionary

log = logging.getLogger(__name__)


def default_lr(width: int) -> float:
    return 4 * 2e-4 * math.sqrt(2 ** 14 / width)


def train_topk(X: torch.Tensor, site_list, width: int, k: int, steps: int, batch_size: int, lr: float | None = None,
               warmup: int = 50, aux_alpha: float = 1 / 32, seed: int = 0, name: str = "dictionary",
               progress: bool = True) -> tuple[Dictionary, list[dict]]:
    """Train a TopK dictionary on activations X [N, L, d] (L = 1: an SAE) → (Dictionary on raw x, history)."""
    N, L, d = X.shape
    if not 0 < k <= width:
        raise UserError(f"dictionary.train.k={k} must be between 1 and the width {width}")
    g = torch.Generator().manual_seed(seed)
    scale = math.sqrt(d) / X.norm(dim=-1).mean(0).clamp_min(1e-8)                    # [L]
    Xs = X * scale[None, :, None]
    w = torch.randn(width, L, d, generator=g)
    w = w / w.flatten(1).norm(dim=1)[:, None, None]
    W_dec = w.clone().requires_grad_(True)
    W_enc = w.permute(1, 2, 0).contiguous().requires_grad_(True)
    b_enc = torch.zeros(width, requires_grad=True)
    b_dec = Xs.mean(0).clone().requires_grad_(True)
    lr = lr or default_lr(width)
    opt = torch.optim.Adam([W_enc, b_enc, W_dec, b_dec], lr=lr, betas=(0.9, 0.999), eps=6.25e-10)
    tail = max(1, int(0.2 * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(warmup, 1)) * min(1.0, (steps - s) / tail))
    since = torch.zeros(width)
    k_aux = max(1, min(width, L * d // 2))
    history = []
    bar = tqdm(range(steps), desc=f"training {name}", leave=False, disable=None if progress else True)
    for step in bar:
        x = Xs[torch.randint(N, (batch_size,), generator=g)]
        pre = torch.einsum("bld,ldf->bf", x - b_dec, W_enc) + b_enc
        vals, top = pre.topk(k, dim=-1)
        f = torch.zeros_like(pre).scatter(-1, top, vals.relu())
        err = x - (torch.einsum("bf,fld->bld", f, W_dec) + b_dec)
        total = (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)
        fvu = err.pow(2).sum() / total
        loss = fvu
        with torch.no_grad():
            since += batch_size
            since[(f > 0).any(0)] = 0
            dead = since > N
        n_dead = int(dead.sum())
        if aux_alpha and n_dead:
            v, i = pre.masked_fill(~dead, float("-inf")).topk(min(k_aux, n_dead), dim=-1)
            e_hat = torch.einsum("bf,fld->bld", torch.zeros_like(pre).scatter(-1, i, v.relu()), W_dec)
            loss = loss + aux_alpha * min(n_dead / k_aux, 1.0) * (e_hat - err.detach()).pow(2).sum() / total
        opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            W_dec.grad -= (W_dec.grad * W_dec).sum((1, 2), keepdim=True) * W_dec
        opt.step()
        sched.step()
        with torch.no_grad():
            W_dec /= W_dec.flatten(1).norm(dim=1).clamp_min(1e-8)[:, None, None]
        if not torch.isfinite(loss):
            raise UserError(f"dictionary training diverged at step {step} (loss {loss.item()}); lower dictionary.train.lr")
        if step % 50 == 0 or step == steps - 1:
            history.append({"step": step, "fvu": fvu.item(), "l0": float((f > 0).sum(-1).float().mean()),
                            "dead": n_dead / width, "lr": sched.get_last_lr()[0]})
            bar.set_postfix(fvu=f"{fvu.item():.3f}", dead=n_dead)
            if progress and step % 200 == 0:
                log.info("%s step %d/%d: batch FVU %.4f, dead %d", name, step, steps, fvu.item(), n_dead)
    with torch.no_grad():                                   # fold the input scale: the dictionary reads raw x
        s = scale[:, None]
        dic = Dictionary(name, tuple(site_list), (W_enc * s[..., None]).detach(), b_enc.detach().clone(),
                         (W_dec / s[None]).detach(), (b_dec / s).detach(), "topk", int(k))
    return dic, history


@torch.no_grad()
def evaluate(dic: Dictionary, X: torch.Tensor, chunk: int = 4096) -> dict:
    """FVU (overall, per layer), L0 and per-feature firing counts of `dic` on activations X [N, L, d]."""
    mean = X.mean(0)
    err = torch.zeros(dic.n_layers, dtype=torch.float64)
    var = torch.zeros(dic.n_layers, dtype=torch.float64)
    fires = torch.zeros(dic.n_features, dtype=torch.float64)
    l0 = 0.0
    for i in range(0, len(X), chunk):
        x = X[i:i + chunk].to(dic.W_enc.device)
        f = dic.encode(x)
        err += (x - dic.decode(f)).pow(2).sum((0, 2)).double().cpu()
        var += (x - mean.to(x.device)).pow(2).sum((0, 2)).double().cpu()
        fires += (f > 0).sum(0).double().cpu()
        l0 += float((f > 0).sum())
    return {"fvu": float(err.sum() / var.sum()), "fvu_per_layer": (err / var).tolist(), "l0": l0 / max(len(X), 1),
            "tokens": len(X), "fires": fires}


@torch.no_grad()
def ce_recovered(loaded, dic: Dictionary, seqs: list[torch.Tensor], batch_size: int = 8) -> list[dict]:
    """Per dictionary layer: CE clean / spliced with the reconstruction / zero-ablated, and the score."""
    model, arch = loaded.model, loaded.arch
    sums = {"clean": 0.0, **{f"{w}{i}": 0.0 for w in ("sae", "zero") for i in range(dic.n_layers)}}
    count = 0
    for b in range(0, len(seqs), batch_size):
        chunk = seqs[b:b + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), loaded.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, s in enumerate(chunk):
            ids[j, :len(s)], mask[j, :len(s)] = s, 1
        ids, mask = ids.to(loaded.device), mask.to(loaded.device)
        keep = mask[:, 1:].bool()

        def ce(logits):
            return float(F.cross_entropy(logits[:, :-1][keep].float(), ids[:, 1:][keep], reduction="sum"))
        seen, handle = sites.capture(model, arch, list(dic.sites), stop=False)
        try:
            sums["clean"] += ce(model(input_ids=ids, attention_mask=mask).logits)
        finally:
            handle.remove()
        xs = torch.stack([seen[s] for s in dic.sites], dim=-2)
        recon = dic.decode(dic.encode(xs))
        for i, site in enumerate(dic.sites):
            for what, value in (("sae", recon[..., i, :]), ("zero", torch.zeros_like(xs[..., i, :]))):
                def splice(x, value=value):                    # every token but the first (BOS-like) one
                    return torch.cat([x[:, :1], value[:, 1:].to(x.dtype)], dim=1)
                h = sites.hook(model, arch, site, splice)
                try:
                    sums[f"{what}{i}"] += ce(model(input_ids=ids, attention_mask=mask).logits)
                finally:
                    h.remove()
        count += int(keep.sum())
    out = []
    for i, site in enumerate(dic.sites):
        clean, sae, zero = sums["clean"] / count, sums[f"sae{i}"] / count, sums[f"zero{i}"] / count
        out.append({"hook": site.hook_name, "ce_clean": clean, "ce_spliced": sae, "ce_zero": zero,
                    "delta_ce": sae - clean, "ce_recovered": (zero - sae) / (zero - clean) if zero != clean else None})
    return out


def default_name(loaded, tcfg) -> str:
    layers = "-".join(str(x) for x in tcfg.layers)
    kind = "sae" if len(tcfg.layers) == 1 else "cc"
    return f"{loaded.fingerprint.get('name', 'model')}-{kind}-L{layers}-{tcfg.site}-F{tcfg.width}-k{tcfg.k}"


def train_dictionary(loaded, tcfg, out: str | Path | None = None) -> tuple[Path, dict]:
    """Corpus → activations → TopK training → evaluation → a new dictionary folder (never overwritten)."""
    n = len(loaded.arch.decoder_layers(loaded.model))
    bad = [x for x in tcfg.layers if not -n <= int(x) < n]
    if bad or len(set(int(x) % n for x in tcfg.layers)) != len(tcfg.layers):
        raise UserError(f"dictionary.train.layers={list(tcfg.layers)} must be distinct layers of the model's {n} "
                        f"(0..{n - 1}, negative from the end)")
    site_list = [sites.Site(int(x) % n, tcfg.site) for x in tcfg.layers]
    target = Path(out or tcfg.get("out") or cache_dir() / "dictionaries" / (tcfg.get("name") or default_name(loaded, tcfg)))
    if target.exists():
        raise UserError(f"dictionary folder {target} exists; pick another dictionary.train.name/out (or use it as it is)")
    seed, t0 = int(tcfg.seed), time.perf_counter()
    seqs = corpus(loaded, tcfg.corpus, seed)
    train_seqs, val_seqs = split(seqs, float(tcfg.heldout), seed)
    t_corpus = time.perf_counter()
    X = activations(loaded, train_seqs, site_list, desc="activations (train)")
    Xv = activations(loaded, val_seqs, site_list, desc="activations (held-out)")
    log.info("corpus: %d sequences, %d train / %d held-out activation vectors", len(seqs), len(X), len(Xv))
    t_acts = time.perf_counter()
    if len(X) < int(tcfg.batch_size):
        log.warning("only %d training vectors for batch size %d: the dictionary will overfit", len(X), tcfg.batch_size)
    dic, history = train_topk(X, site_list, int(tcfg.width), int(tcfg.k), int(tcfg.steps), int(tcfg.batch_size),
                              tcfg.get("lr"), int(tcfg.warmup), float(tcfg.aux_alpha), seed, name=target.name)
    t_train = time.perf_counter()
    held, train_eval = evaluate(dic, Xv), evaluate(dic, X)
    fires = held.pop("fires") + train_eval.pop("fires")
    ce_seqs, budget = [], int(tcfg.ce_tokens)
    for s in val_seqs:
        if budget <= 0:
            break
        ce_seqs.append(s)
        budget -= len(s)
    ce = ce_recovered(loaded, dic, ce_seqs) if ce_seqs else []
    record = {
        "kind": "sae" if dic.n_layers == 1 else "crosscoder", "hooks": [s.hook_name for s in site_list],
        "width": dic.n_features, "k": dic.k, "lr": tcfg.get("lr") or default_lr(dic.n_features),
        "heldout": held, "train": train_eval, "dead_fraction": float((fires == 0).float().mean()),
        "ce": ce, "ce_recovered_mean": _mean([c["ce_recovered"] for c in ce]),
        "delta_ce_mean": _mean([c["delta_ce"] for c in ce]),
        "corpus": {"train": describe(train_seqs), "heldout": describe(val_seqs), "ce_tokens": describe(ce_seqs)},
        "history": history, "model": loaded.fingerprint,
        "seconds": {"corpus": t_corpus - t0, "activations": t_acts - t_corpus, "training": t_train - t_acts,
                    "evaluation": time.perf_counter() - t_train},
    }
    freq = fires / max(len(X) + len(Xv), 1)
    meta = {"model_name": loaded.fingerprint.get("name"), "dataset_path": "crabsweep dictionary corpus",
            "context_size": int(tcfg.corpus.context), "crabsweep_seed": seed}
    save_dictionary(dic, target, meta, torch.log10(freq + 1e-10).float(), extra={"training.json": record})
    return target, record


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None
