"""`crabsweep dictionary compare`: the crosscoder post's comparison of the three ablations of one feature.

For a feature i (given, or the one most raised by `prompts` over `clean_prompts`), every setting —
no ablation; single_layer at each layer × each scale; many_layer × each scale; perturbation × each lr
(`steps` fixed) — generates greedy continuations of `prompts` with the feature ablated (base model, no
adapter), and is scored by
  ce        the cross-entropy of those continuations under the clean model given `clean_prompts`
            (the counterfactual: how much the ablated output looks like the model's output without the
            trigger), mean ± standard error over prompts — lower is better;
  residual  re-encoding the ablated run's activations over prompt + continuation: Σ f_i after / Σ f_i of
            the clean run on the same tokens (0: the feature stays off), and `off` = the fraction of
            tokens where the clean f_i > 0 and the re-encoded f_i ≤ epsilon × the clean maximum.
Reference lines: the clean model's own continuation of `clean_prompts` (the target) and of `prompts`.
Writes compare.json and compare.png (CE and residual against scale / lr, one panel per method).
"""

from __future__ import annotations

import logging
import math
from contextlib import nullcontext
from pathlib import Path

import torch

from .. import io
from ..core.observers import Capture
from ..core.tasks import Example, Sample, render
from ..errors import UserError
from ..loop.metrics import eval_loss, greedy_ids
from .ablate import Ablate

log = logging.getLogger(__name__)


def _ids(tokenizer, prompts: list[str], chat: bool) -> list[list[int]]:
    if chat:
        return [tokenizer(render(tokenizer, p, None), add_special_tokens=False)["input_ids"] for p in prompts]
    return [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]


def generate_with(session, interventions, prompt_ids: list[list[int]], max_new_tokens: int,
                  adapter: bool = False) -> list[list[int]]:
    """Greedy continuations (token ids, up to and including EOS) of one left-padded batch under `interventions`."""
    with session.intervene(*interventions), (nullcontext() if adapter else session.adapter.disabled()):
        return [row.tolist() for row in greedy_ids(session, prompt_ids, max_new_tokens, batch_size=len(prompt_ids))]


def _examples(prompt_ids, continuations) -> list[Example]:
    out = []
    for i, (p, c) in enumerate(zip(prompt_ids, continuations)):
        ids = torch.tensor(list(p) + list(c), dtype=torch.long)
        labels = torch.full_like(ids, -100)
        labels[len(p):] = ids[len(p):]
        out.append(Example(Sample(f"compare:{i}", "", "", "compare"), ids, labels, torch.ones(len(ids)),
                           torch.tensor(list(p), dtype=torch.long)))
    return out


@torch.no_grad()
def clean_ce(session, prompt_ids, continuations) -> list[float]:
    """Per sequence: mean CE of the continuation under the base model (no adapter, no edit) given the prompt."""
    keep = [i for i, c in enumerate(continuations) if c]
    if not keep:
        return []
    with session.adapter.disabled():
        per = eval_loss(session, _examples([prompt_ids[i] for i in keep], [continuations[i] for i in keep]))["per_sample"]
    return [per[f"compare:{j}"] for j in range(len(keep))]


@torch.no_grad()
def feature_values(session, group: int, feature: int, sequences, interventions=()) -> list[torch.Tensor]:
    """Feature `feature`'s (re-)encoded activation at every token of each sequence, under `interventions`."""
    out = []
    for seq in sequences:
        cap = Capture()
        ids = torch.tensor([list(seq)], device=session.device)
        with session.adapter.disabled(), session.intervene(*interventions), session.observe(cap), session.precision():
            session.model(input_ids=ids)
        out.append(cap.acts[group][0, :, feature].float().cpu())
    return out


def choose_feature(session, group: int, prompt_ids, contrast_ids) -> int:
    """The feature whose mean activation (tokens after the first) rises most from `contrast` to `prompts`."""
    def mean(seqs):
        cap, total, n = Capture(), None, 0
        for seq in seqs:
            with session.adapter.disabled(), session.observe(cap), session.precision(), torch.no_grad():
                session.model(input_ids=torch.tensor([list(seq)], device=session.device))
            a = cap.acts[group][0, 1:].float().cpu()
            total = a.sum(0) if total is None else total + a.sum(0)
            n += len(a)
        return total / max(n, 1)
    return int((mean(prompt_ids) - mean(contrast_ids)).argmax())


def _settings(ccfg, layers) -> list[dict]:
    out = [{"method": "none"}]
    out += [{"method": "single_layer", "layer": int(layer), "scale": float(s)} for layer in layers for s in ccfg.scales]
    out += [{"method": "many_layer", "scale": float(s)} for s in ccfg.scales]
    out += [{"method": "perturbation", "lr": float(lr), "steps": int(ccfg.steps)} for lr in ccfg.lrs]
    return out


def _stats(xs: list[float]) -> tuple[float | None, float | None]:
    if not xs:
        return None, None
    m = sum(xs) / len(xs)
    sem = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs)) if len(xs) > 1 else 0.0
    return m, sem


def compare(session, ccfg, out_dir: str | Path) -> dict:
    """Run every setting, write compare.json and compare.png into `out_dir`, return the record."""
    basis = session.basis
    if basis.name != "dictionary_feature":
        raise UserError("dictionary compare needs suppression=dictionary_feature suppression.path=<dictionary>")
    group = 0 if ccfg.get("dictionary") is None else basis.unit_from_json({"dictionary": ccfg.dictionary, "feature": 0})[0]
    dic = basis.dictionaries[group]
    layers = list(ccfg.layers) if ccfg.get("layers") else list(dic.layers)
    for layer in layers:
        basis.slots_for(group, layer)                                  # refuses a layer the dictionary lacks
    tok = session.tokenizer
    prompt_ids = _ids(tok, list(ccfg.prompts), bool(ccfg.chat))
    clean_ids = _ids(tok, list(ccfg.clean_prompts or ccfg.prompts), bool(ccfg.chat))
    feature = ccfg.get("feature")
    if feature is None:
        if ccfg.get("clean_prompts") is None:
            raise UserError("dictionary.compare.feature=null needs clean_prompts to contrast with; give one or both")
        feature = choose_feature(session, group, prompt_ids, clean_ids)
    basis.check([(group, int(feature))], "dictionary.compare.feature")
    n_new = int(ccfg.max_new_tokens)
    target = generate_with(session, [], clean_ids, n_new)
    reference = {"clean_prompt_ce": _stats(clean_ce(session, clean_ids, target))[0]}
    rows = []
    for setting in _settings(ccfg, layers):
        ivs = [] if setting["method"] == "none" else [Ablate(((group, int(feature)),), setting["method"],
                                                             setting.get("scale", 1.0), setting.get("layer"),
                                                             setting.get("lr", 1.0), setting.get("steps", 15),
                                                             bool(ccfg.propagate))]
        gens = generate_with(session, ivs, prompt_ids, n_new)
        ce, sem = _stats(clean_ce(session, clean_ids, gens))
        seqs = [list(p) + list(g) for p, g in zip(prompt_ids, gens)]
        before = feature_values(session, group, int(feature), seqs)
        after = feature_values(session, group, int(feature), seqs, ivs)
        b, a = torch.cat(before), torch.cat(after)
        active = b > 0
        off = (a[active] <= float(ccfg.epsilon) * float(b.max())).float().mean() if active.any() else torch.tensor(1.0)
        rows.append({**setting, "ce": ce, "ce_sem": sem, "feature_clean": float(b.sum()), "feature_after": float(a.sum()),
                     "residual": float(a.sum() / b.sum()) if b.sum() > 0 else None, "off": float(off),
                     "texts": [tok.decode(g, skip_special_tokens=True) for g in gens]})
        log.info("%s: CE %s, residual %s", _label(setting), _fmt(ce), _fmt(rows[-1]["residual"]))
    record = {"dictionary": dic.name, "feature": int(feature), "hooks": [s.hook_name for s in dic.sites],
              "prompts": list(ccfg.prompts), "clean_prompts": list(ccfg.clean_prompts or ccfg.prompts),
              "steps": int(ccfg.steps), "propagate": bool(ccfg.propagate), "epsilon": float(ccfg.epsilon),
              "reference": {**reference, "target_texts": [tok.decode(g, skip_special_tokens=True) for g in target]},
              "rows": rows}
    out_dir = Path(out_dir)
    io.write_json(out_dir / "compare.json", record)
    plot_compare(record, out_dir / "compare.png")
    return record


def _label(s: dict) -> str:
    if s["method"] == "single_layer":
        return f"single_layer L{s['layer']} ×{s['scale']:g}"
    if s["method"] == "many_layer":
        return f"many_layer ×{s['scale']:g}"
    if s["method"] == "perturbation":
        return f"perturbation lr {s['lr']:g}"
    return "no ablation"


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def plot_compare(record: dict, path: str | Path) -> None:
    """CE (top) and re-encoded residual (bottom) against scale / lr, one column per method."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = record["rows"]
    none = next(r for r in rows if r["method"] == "none")
    fig, ax = plt.subplots(2, 3, figsize=(15, 8), sharey="row")
    panels = [("single_layer", "scale"), ("many_layer", "scale"), ("perturbation", "lr")]
    for col, (method, knob) in enumerate(panels):
        mine = [r for r in rows if r["method"] == method]
        groups = sorted({r.get("layer") for r in mine}, key=lambda v: -1 if v is None else v)
        for layer in groups:
            pts = sorted((r[knob], r["ce"], r["ce_sem"] or 0.0, r["residual"]) for r in mine
                         if r.get("layer") == layer and r["ce"] is not None)
            if not pts:
                continue
            xs, ce, sem, res = zip(*pts)
            label = f"layer {layer}" if layer is not None else method
            ax[0, col].errorbar(xs, ce, yerr=sem, marker="o", capsize=3, label=label)
            ax[1, col].plot(xs, [r if r is not None else float("nan") for r in res], marker="o", label=label)
        for row in (0, 1):
            ax[row, col].set_xscale("log", base=2 if knob == "scale" else 10)
        if none["ce"] is not None:
            ax[0, col].axhline(none["ce"], color="grey", ls="--", label="no ablation")
        if record["reference"]["clean_prompt_ce"] is not None:
            ax[0, col].axhline(record["reference"]["clean_prompt_ce"], color="green", ls=":", label="clean prompt (target)")
        ax[1, col].axhline(0.0, color="green", ls=":")
        ax[0, col].set(title=f"{method} ({'steps ' + str(record['steps']) if knob == 'lr' else 'f_i·d_i × scale'})",
                       ylabel="CE under the clean model" if col == 0 else None)
        ax[1, col].set(xlabel=knob, ylabel="re-encoded Σf_i / clean Σf_i" if col == 0 else None)
        ax[0, col].legend(fontsize=7)
    fig.suptitle(f"ablating feature {record['feature']} of {record['dictionary']} ({', '.join(record['hooks'])})")
    fig.tight_layout()
    io.save_figure(fig, path, dpi=90)   # complete or absent
    plt.close(fig)
