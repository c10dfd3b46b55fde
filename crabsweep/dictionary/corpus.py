"""Training text for a dictionary, needing no network, and the model's activations on it.

The corpus is token sequences from two sources:
  shipped    the generic texts (data/generic/texts.json, raw) and every shipped task's samples
             (data/*/, chat-formatted prompt + answer) — a few thousand tokens;
  generated  the model's own sampled answers to a list of diverse prompts (data/dictionary/prompts.json:
             `samples_per_prompt` × `max_new_tokens` each, seeded), cached under
             $CRABSWEEP_CACHE/corpus/<hash>.json keyed by the model's weights and the settings.
Sequences are cut to `context` tokens and the total to `max_tokens`. `activations` runs the model on
them and returns every site's activation at every token but the first (BOS-like, huge-norm) one.
"""

from __future__ import annotations

import hashlib
import json
import logging

import torch
from tqdm.auto import tqdm

from .. import io
from ..config import ROOT
from ..core.models import cache_dir
from ..core.tasks import load_samples, render
from ..core.unitsets import read_json_file
from ..errors import UserError
from . import sites

log = logging.getLogger(__name__)


def shipped_texts(tokenizer) -> list[str]:
    """The package's own texts: generic texts (raw) and every task's samples (chat-formatted)."""
    texts = list(read_json_file(ROOT / "data" / "generic" / "texts.json", "generic text set")["texts"])
    for conf in sorted((ROOT / "conf" / "task").glob("*.yaml")):          # the shipped tasks' folders
        folder = ROOT / "data" / conf.stem
        if folder.is_dir() and any(folder.glob("*.json")):
            texts += [render(tokenizer, s.input, s.output) for s in load_samples(folder)]
    return texts


def _prompts(path) -> list[str]:
    data = read_json_file(path, "prompt list")
    prompts = data.get("prompts") if isinstance(data, dict) else data
    if not isinstance(prompts, list) or not all(isinstance(p, str) and p for p in prompts):
        raise UserError(f"{path}: expected {{\"prompts\": [\"...\", ...]}} (non-empty strings)")
    return prompts


@torch.no_grad()
def generated(loaded, ccfg, seed: int) -> list[list[int]]:
    """Prompt + sampled answer token ids for each (prompt, sample); cached by model and settings."""
    prompts = _prompts(ccfg.prompts) if ccfg.get("prompts") else []
    n, new = int(ccfg.samples_per_prompt), int(ccfg.max_new_tokens)
    if not prompts or n == 0 or new == 0:
        return []
    key = hashlib.sha256(json.dumps({"model": loaded.fingerprint, "prompts": prompts, "n": n, "new": new,
                                     "t": float(ccfg.temperature), "seed": seed}, sort_keys=True).encode()).hexdigest()
    path = cache_dir() / "corpus" / f"{key[:24]}.json"
    if path.exists():
        return io.read_json(path)["sequences"]
    tok, model = loaded.tokenizer, loaded.model
    rows = [tok(render(tok, p, None), add_special_tokens=False)["input_ids"] for p in prompts for _ in range(n)]
    out: list[list[int]] = []
    bs = int(ccfg.batch_size)
    g = torch.Generator(device="cpu").manual_seed(seed)
    log.info("generating the corpus: %d prompts × %d samples × ≤ %d tokens (cached afterwards in %s)",
             len(prompts), n, new, path.parent)
    for i in tqdm(range(0, len(rows), bs), desc="generating corpus", leave=False, disable=None):
        log.info("corpus batch %d/%d", i // bs + 1, -(-len(rows) // bs))
        chunk = rows[i:i + bs]
        width = max(map(len, chunk))
        ids = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in chunk])     # left padding
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in chunk])
        with torch.random.fork_rng(devices=[]):                  # sampling is seeded, the global RNG untouched
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
            gen = model.generate(input_ids=ids.to(loaded.device), attention_mask=mask.to(loaded.device),
                                 max_new_tokens=new, do_sample=True, temperature=float(ccfg.temperature), top_k=0,
                                 top_p=1.0, pad_token_id=tok.pad_token_id)[:, width:].cpu()
        for r, answer in zip(chunk, gen.tolist()):
            if tok.eos_token_id in answer:
                answer = answer[:answer.index(tok.eos_token_id) + 1]
            out.append(r + answer)
    io.write_json(path, {"model": loaded.fingerprint, "prompts": len(prompts), "sequences": out})
    return out


def corpus(loaded, ccfg, seed: int = 0) -> list[torch.Tensor]:
    """Token sequences (shipped then generated), each ≤ `context` tokens, ≤ `max_tokens` in all."""
    tok = loaded.tokenizer
    seqs = [tok(t, add_special_tokens=True)["input_ids"] for t in shipped_texts(tok)] if ccfg.shipped else []
    seqs += generated(loaded, ccfg, seed)
    out, total = [], 0
    for s in seqs:
        s = s[:int(ccfg.context)]
        if len(s) < 2 or total >= int(ccfg.max_tokens):
            continue
        out.append(torch.tensor(s, dtype=torch.long))
        total += len(s)
    if not out:
        raise UserError("the dictionary corpus is empty; set dictionary.train.corpus.shipped=true or give prompts")
    return out


@torch.no_grad()
def activations(loaded, seqs: list[torch.Tensor], site_list: list, batch_size: int = 8,
                desc: str = "activations") -> torch.Tensor:
    """[N, L, d] fp32 activations at `site_list` (in that order) over every token but each sequence's first."""
    model, arch = loaded.model, loaded.arch
    backbone = sites.backbone_of(model, arch)
    out = []
    for i in tqdm(range(0, len(seqs), batch_size), desc=desc, leave=False, disable=None):
        chunk = seqs[i:i + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), loaded.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, s in enumerate(chunk):
            ids[j, :len(s)], mask[j, :len(s)] = s, 1
        seen, handle = sites.capture(model, arch, site_list)
        try:
            backbone(input_ids=ids.to(loaded.device), attention_mask=mask.to(loaded.device), use_cache=False)
        except sites.Stop:
            pass
        finally:
            handle.remove()
        x = torch.stack([seen[s] for s in site_list], dim=-2).float().cpu()      # [B, T, L, d]
        keep = mask.bool().clone()
        keep[:, 0] = False
        out.append(x[keep])
    return torch.cat(out)


def split(seqs: list, heldout: float, seed: int) -> tuple[list, list]:
    """A seeded split of whole sequences (held-out text never seen in training); ≥ 1 each when possible."""
    order = torch.randperm(len(seqs), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, round(heldout * len(seqs))) if len(seqs) > 1 else 0
    return [seqs[i] for i in order[n_val:]], [seqs[i] for i in order[:n_val]]


def describe(seqs: list) -> dict:
    return {"sequences": len(seqs), "tokens": int(sum(len(s) for s in seqs))}


