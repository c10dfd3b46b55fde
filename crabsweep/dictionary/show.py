"""What `crabsweep dictionary train | compare | info` print."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from ..console import _console, _fmt


def print_dictionary_info(dic) -> None:
    console = _console(100)
    table = Table(title=f"dictionary {dic.name}")
    table.add_column("key")
    table.add_column("value")
    for k, v in (("source", dic.source), ("kind", "SAE" if dic.n_layers == 1 else f"crosscoder over {dic.n_layers} sites"),
                 ("hooks", ", ".join(s.hook_name for s in dic.sites)), ("width d", dic.d), ("features", dic.n_features),
                 ("activation", dic.activation + (f" (k={dic.k})" if dic.k else "")),
                 ("apply_b_dec_to_input", dic.apply_b_dec_to_input)):
        table.add_row(k, str(v))
    console.print(table)


def print_dictionary_training(folder: Path, rec: dict) -> None:
    console = _console(100)
    held = rec["heldout"]
    console.print(f"{rec['kind']} at {', '.join(rec['hooks'])}: {rec['width']} features, k={rec['k']}, lr {rec['lr']:.3g}; "
                  f"{rec['corpus']['train']['tokens']} train / {rec['corpus']['heldout']['tokens']} held-out tokens",
                  markup=False)
    console.print(f"held-out FVU {held['fvu']:.4f} (train {rec['train']['fvu']:.4f}), L0 {held['l0']:.1f}, "
                  f"dead features {100 * rec['dead_fraction']:.1f}%", markup=False)
    table = Table(title="cross-entropy with the layer spliced (held-out, every token but the first)")
    for c in ("hook", "CE clean", "CE spliced", "CE zero", "ΔCE", "CE recovered"):
        table.add_column(c, justify="right")
    for c in rec["ce"]:
        table.add_row(c["hook"], _fmt(c["ce_clean"], 3), _fmt(c["ce_spliced"], 3), _fmt(c["ce_zero"], 3),
                      _fmt(c["delta_ce"], 3), _fmt(c["ce_recovered"], 3))
    console.print(table)
    s = rec["seconds"]
    console.print(f"{sum(s.values()):.0f}s (corpus {s['corpus']:.0f}s, activations {s['activations']:.0f}s, "
                  f"training {s['training']:.0f}s, evaluation {s['evaluation']:.0f}s); saved {folder}", markup=False)


def print_compare(rec: dict, run_dir: Path) -> None:
    console = _console(110)
    table = Table(title=f"ablating feature {rec['feature']} of {rec['dictionary']} — CE under the clean model "
                        f"(target {_fmt(rec['reference']['clean_prompt_ce'], 3)})")
    for c in ("method", "layer", "scale / lr", "CE", "± sem", "residual", "off"):
        table.add_column(c, justify="right")
    for r in rec["rows"]:
        knob = r.get("scale", r.get("lr"))
        table.add_row(r["method"], "" if r.get("layer") is None else str(r["layer"]), "" if knob is None else f"{knob:g}",
                      _fmt(r["ce"], 3), _fmt(r["ce_sem"], 3), _fmt(r["residual"], 3), _fmt(r["off"], 2))
    console.print(table)
    console.print(f"records: {run_dir / 'compare.json'}, plot: {run_dir / 'compare.png'}", markup=False)
