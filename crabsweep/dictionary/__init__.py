"""Sparse dictionaries (SAEs, crosscoders) as crabsweep units: load, train, ablate, steer, compare.

    from crabsweep import dictionary as D
    dic = D.load_dictionary("path/to/sae")                  # SAELens, sparsify or crosscoder folder
    session = cs.load_session("suppression=dictionary_feature", "suppression.path=path/to/sae", ...)
    with session.intervene(D.Ablate([(0, 12)], method="perturbation", lr=1.0)): ...
    with session.intervene(D.Steer([(0, 12)], alpha=8.0)): ...
    folder, metrics = D.train_dictionary(session.loaded, cfg.dictionary.train)
    report = D.compare(session, cfg.dictionary.compare, out_dir)

Modules: sites (where dictionaries read/write), formats (on-disk formats), ablate (edits), basis
(`suppression=dictionary_feature`), train (a small TopK SAE / crosscoder trainer), compare (the
three ablation methods side by side). Names below are imported on first use.
"""

from __future__ import annotations

from .._lazy import lazy_exports

_EXPORTS = {
    "Dictionary": "formats", "load_dictionary": "formats", "save_dictionary": "formats",
    "Site": "sites", "parse_site": "sites",
    "Ablate": "ablate", "Steer": "ablate", "Clamp": "ablate",
    "DictionaryFeatures": "basis", "resolve": "basis",
    "train_dictionary": "train", "train_topk": "train", "corpus": "train",
    "compare": "compare", "generate_with": "compare",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS, globals())
