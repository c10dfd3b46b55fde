"""fp32 vs bf16 on this CPU: training speed and whether round 0 agrees.

    .venv/bin/python benchmarks/precision.py                      # embedded SmolLM2, critique task
    .venv/bin/python benchmarks/precision.py model=tiny_llama task=tiny
    .venv/bin/python benchmarks/precision.py --profile            # where the time goes, per dtype

For each dtype, one session (weights in that dtype, autocast around every forward, adapter and optimizer
in fp32) runs the default round 0 (train, evaluate, no generation) twice; the faster run's training
tokens/s is reported. Agreement: round-0 final and held-out loss (relative difference; goal ≤ 2 %) and
the overlap of the top-16 units of every streamed method. Also the matmul peak of each dtype.
"""

from __future__ import annotations

import sys
import time

import torch
from omegaconf import OmegaConf

from crabsweep.api import load_session
from crabsweep.loop.round import run_round

METHODS = ("lora_a_grad", "grad_norm", "grad_x_act", "max_grad")


def matmul_peak(dtype: torch.dtype, n: int = 1536, reps: int = 20) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def top_units(scores, k: int = 16) -> set:
    flat = torch.cat([s.flatten().float() for s in scores])
    sizes = [s.numel() for s in scores]
    idx = flat.topk(k).indices.tolist()
    out = set()
    for i in idx:
        g = 0
        while i >= sizes[g]:
            i -= sizes[g]
            g += 1
        out.add((g, i))
    return out


def measure(dtype: str, overrides: list[str]) -> dict:
    session = load_session(f"dtype={dtype}", "chain.recruit_audit=false", *overrides)
    runs = []
    for _ in range(2):
        result = run_round(session, [], 0, generations=False, posthoc=False)
        runs.append(result)
    best = max(runs, key=lambda r: r.timing["tokens_per_second"])
    m = best.metrics
    return {"tok_s": best.timing["tokens_per_second"], "final": m["final_loss"], "heldout": m["heldout_loss"],
            "behaviour_ce": m.get("behaviour_ce"), "tops": {k: top_units(best.scores[k]) for k in METHODS},
            "same_twice": runs[0].metrics["final_loss"] == runs[1].metrics["final_loss"]}


def main(overrides: list[str]) -> None:
    fp32, bf16 = measure("fp32", overrides), measure("bf16", overrides)
    p32, p16 = matmul_peak(torch.float32), matmul_peak(torch.bfloat16)
    print(f"threads={torch.get_num_threads()}  matmul peak fp32 {p32:.1f} GFLOP/s, bf16 {p16:.1f} GFLOP/s "
          f"({p16 / p32:.2f}×)")
    print(f"training tokens/s: fp32 {fp32['tok_s']:.1f}, bf16 {bf16['tok_s']:.1f} → {bf16['tok_s'] / fp32['tok_s']:.2f}× "
          "(goal ≥ 1.6×)")
    for key in ("final", "heldout", "behaviour_ce"):
        a, b = fp32[key], bf16[key]
        if a is not None and b is not None:
            print(f"round 0 {key:<12}: fp32 {a:.4f}, bf16 {b:.4f}, relative difference {abs(b - a) / abs(a):.2%}")
    for method in METHODS:
        print(f"top-16 overlap {method:<12}: {len(fp32['tops'][method] & bf16['tops'][method])}/16")
    print(f"same config twice gives the same loss: fp32 {fp32['same_twice']}, bf16 {bf16['same_twice']}")


if __name__ == "__main__" and "--profile" not in sys.argv:
    main(sys.argv[1:])


def profile(dtype: str, overrides: list[str], steps: int = 3) -> str:
    """torch.profiler's top ops (self CPU time) over `steps` training steps in `dtype`."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from crabsweep.loop.train import train
    session = load_session(f"dtype={dtype}", *overrides)
    session.adapter.reset(0)
    examples = session.task.train[:steps]
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        train(session, examples, OmegaConf.merge(session.cfg.train, {"epochs": 1, "batch_size": 1}), 0)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8)


if __name__ == "__main__" and "--profile" in sys.argv:
    for dt in ("fp32", "bf16"):
        print(f"--- {dt}\n{profile(dt, [a for a in sys.argv[1:] if a != '--profile'])}")
