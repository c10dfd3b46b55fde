"""Cost of attribution: training tokens/s with every streamed method captured vs the same loop with no hooks.

    .venv/bin/python benchmarks/round_overhead.py                 # embedded SmolLM2, critique task
    .venv/bin/python benchmarks/round_overhead.py model=tiny_llama task=tiny

Both variants run the same `train()` on the same session, alternating (A B A B …) so that drift on a
shared machine hits both; the best repeat of each is compared. Also prints the achieved GFLOP/s of
the attributed loop against the float32 and bfloat16 matmul peaks measured in the same run (the issue's
goal: ≥ 50 % of the bf16 peak).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from contextlib import nullcontext

import torch

from crabsweep.methods.streamed import Recorder
from crabsweep.config import compose_config
from crabsweep.core.session import Session
from crabsweep.loop.train import train

sys.path.insert(0, str(Path(__file__).parent))
from precision import matmul_peak  # noqa: E402  (benchmarks/precision.py)


def train_flops(session, epochs: int) -> float:
    """Matmul FLOPs of one training pass: frozen base → forward 2·N·T + input-gradient backward 2·N·T
    for every Linear (lm_head only on answer positions), + eager attention (QKᵀ and AV, ×3 for backward)."""
    model, cfg = session.loaded.model, session.loaded.model.config
    per_token = sum(m.in_features * m.out_features for n, m in model.named_modules()
                    if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head"))
    lm_head = cfg.vocab_size * cfg.hidden_size
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    total = 0.0
    for e in session.task.train:
        t = len(e.input_ids)
        answer = int((e.labels != -100).sum()) + 1
        total += 4 * per_token * t + 4 * lm_head * answer
        total += 3 * cfg.num_hidden_layers * 4 * t * t * heads * head_dim
    return total * epochs


def run(session, attributed: bool) -> float:
    cfg = session.cfg
    session.adapter.reset(int(cfg.seed))
    recorder = Recorder(session) if attributed else None
    t = time.perf_counter()
    with session.observe(recorder) if attributed else nullcontext():
        train(session, session.task.train, cfg.train, int(cfg.seed), on_step_end=recorder.end_step if recorder else None)
    return time.perf_counter() - t


def main(overrides: list[str]) -> None:
    cfg, _ = compose_config("round", ["train.epochs=1", *overrides])
    session = Session(cfg)
    tokens = sum(len(e.input_ids) for e in session.task.train) * int(cfg.train.epochs)
    run(session, True)                                    # warm-up (allocator, kernels)
    times = {True: [], False: []}
    for _ in range(3):
        for attributed in (False, True):
            times[attributed].append(run(session, attributed))
    base, attr = min(times[False]), min(times[True])
    flops = train_flops(session, int(cfg.train.epochs))
    peak, peak16 = matmul_peak(torch.float32), matmul_peak(torch.bfloat16)
    print(f"model={cfg.model.name} task={cfg.task.name} tokens/pass={tokens} threads={torch.get_num_threads()}")
    print(f"no hooks        : {tokens / base:8.1f} tok/s  (best of {len(times[False])}: {base:.2f}s)")
    print(f"all attribution : {tokens / attr:8.1f} tok/s  (best of {len(times[True])}: {attr:.2f}s)")
    print(f"overhead        : {attr / base - 1:+.1%}   (goal ≤ +10%)")
    achieved, dtype = flops / attr / 1e9, str(session.loaded.dtype).replace("torch.", "")
    print(f"achieved        : {achieved:8.1f} GFLOP/s ({dtype}) vs fp32 matmul peak {peak:.1f} GFLOP/s "
          f"({achieved / peak:.0%}) and bf16 matmul peak {peak16:.1f} GFLOP/s ({achieved / peak16:.0%}; goal ≥ 50 %)")


if __name__ == "__main__":
    main(sys.argv[1:])
