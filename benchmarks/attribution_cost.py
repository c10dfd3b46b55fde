"""Cost of each attribution method relative to plain training, in one run, on the same session.

    .venv/bin/python benchmarks/attribution_cost.py                  # embedded SmolLM2, critique task
    .venv/bin/python benchmarks/attribution_cost.py model=tiny_llama task=tiny

Streamed methods (lora_a_grad, grad_norm, grad_x_act, max_grad) ride on the training pass: their
cost is that pass's slowdown. Post-hoc methods (integrated_gradients, cna, relp) run after training:
their cost is their own pass, as a multiple of one plain training epoch.
"""

from __future__ import annotations

import sys
import time

from contextlib import nullcontext

from crabsweep.config import compose_config
from crabsweep.core.session import Session
from crabsweep.loop.train import train
from crabsweep.methods.cna import run as cna
from crabsweep.methods.ig import integrated_gradients
from crabsweep.methods.relp import run as relp
from crabsweep.methods.streamed import Recorder


def epoch(session, hooked: bool) -> float:
    session.adapter.reset(int(session.cfg.seed))
    recorder = Recorder(session) if hooked else None
    t = time.perf_counter()
    with session.observe(recorder) if hooked else nullcontext():
        train(session, session.task.train, session.cfg.train, int(session.cfg.seed),
              on_step_end=recorder.end_step if recorder else None)
    return time.perf_counter() - t


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main(overrides: list[str]) -> None:
    cfg, _ = compose_config("round", ["train.epochs=1", "tracker=none", *overrides])
    session = Session(cfg)
    epoch(session, True)                                           # warm-up
    plain = min(epoch(session, False) for _ in range(2))
    streamed = min(epoch(session, True) for _ in range(2))        # leaves a trained adapter
    mask = session.mask([])
    n_steps = 16
    costs = {
        f"integrated_gradients (n_steps={n_steps})": timed(lambda: integrated_gradients(session, mask, n_steps)),
        "cna (adapted vs base, target tokens)": timed(lambda: cna(session, cfg.attribution, mask)),
        "relp (linearized, target log-prob)": timed(lambda: relp(session, cfg.attribution, mask)),
    }
    print(f"model={cfg.model.name} task={cfg.task.name}: one training epoch = {len(session.task.train)} steps")
    print(f"plain training epoch                       : {plain:7.2f}s   1.00×")
    print(f"+ lora_a_grad, grad_norm, grad_x_act, max_grad: {streamed:7.2f}s   {streamed / plain:.2f}× "
          f"(overhead {streamed / plain - 1:+.1%})")
    for name, seconds in costs.items():
        print(f"{name:43s}: {seconds:7.2f}s   {seconds / plain:.2f}× an epoch")


if __name__ == "__main__":
    main(sys.argv[1:])
