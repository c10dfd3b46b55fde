"""Every bad input is one line (issue 14): exit code 2, one line on stderr, no traceback, nothing left behind.

Each case runs through the real CLI (`crabsweep.cli.main`) with the working directory set to the case's
own temporary folder, so default run folders (`multirun/...`) land there too. Before and after, the
whole folder is listed with the content hash of every file: nothing may appear, vanish or change —
an existing run folder handed to a command (resume, reproduce, ensemble) stays byte-identical, except
that a run's `crabsweep.log` may grow by the lines of the refused attempt.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import transformers

from crabsweep.cli import main

TINY = ["model=tiny_llama", "task=tiny", "eval.max_new_tokens=4", "tracker=none", "train.epochs=1"]
CHAIN = [*TINY, "chain.rounds=1", "chain.control=none", "k.k=2", "train.lr=1e-2"]
NON_UTF8_CONFIG = b'{"a": "\xff"}'
MALFORMED_TASK = '{"input": "a",'
LATIN1_TASK = b'{"input": "caf\xe9", "output": "x"}'
LATIN1_TEXTS = b'{"texts": ["\xff"]}'
LATIN1_UNITS = b'[[0, 1]] \xff'
LATIN1_YAML = b'seed: \xff'
STRING_TASK = '"text"'


@pytest.fixture(scope="module")
def finished_chain(tmp_path_factory):
    run = tmp_path_factory.mktemp("bad-inputs") / "chain"
    assert main(["chain", *CHAIN, f"hydra.run.dir={run}"]) == 0
    return run


class Box:
    """A case's folder and the inputs it is built from."""

    def __init__(self, root: Path, chain_src: Path):
        self.root, self._chain_src = root, chain_src
        self.run = root / "run"
        self._immutable: list[Path] = []

    def file(self, name: str, content) -> Path:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
        return path

    def task(self, content, name: str = "task/bad.json") -> Path:
        return self.file(name, content).parent

    def folder(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(parents=True)
        return path

    def chain(self, name: str = "chain") -> Path:
        """A copy of a finished tiny chain (rounds 0 and 1 with LoRA adapters) inside this case's folder."""
        dst = self.root / name
        if not dst.exists():
            shutil.copytree(self._chain_src, dst)
        return dst

    def damaged(self, rel: str, content: bytes | None = None) -> Path:
        """A copy of the finished chain whose file `rel` is cut in half (or replaced by `content`)."""
        run = self.chain()
        path = run / rel
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2] if content is None else content)
        return run

    def truncate(self, path: Path) -> Path:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        return path

    def immutable(self, name: str) -> Path:
        """A folder even root cannot write into (chattr +i; undone after the case)."""
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["chattr", "+i", str(path)], check=True)
        self._immutable.append(path)
        return path

    def checkpoint(self, files: dict | None = None, with_tokenizer: bool = True, model_type: str = "llama") -> Path:
        """A small transformers checkpoint folder (`files` adds or replaces files)."""
        from crabsweep.core.models import byte_tokenizer
        path = self.root / f"ckpt-{model_type}"
        if model_type == "gpt2":
            config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=300)
            transformers.GPT2LMHeadModel(config).save_pretrained(path)
        else:
            config = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                              num_attention_heads=2, num_key_value_heads=1, vocab_size=300)
            transformers.LlamaForCausalLM(config).save_pretrained(path)
        if with_tokenizer:
            byte_tokenizer().save_pretrained(path)
        for name, content in (files or {}).items():
            (path / name).write_bytes(content if isinstance(content, bytes) else content.encode())
        return path

    def release(self) -> None:
        for path in self._immutable:
            subprocess.run(["chattr", "-i", str(path)], check=False)


def snapshot(root: Path) -> dict:
    """relative path → 'dir' | sha256 of the content (a crabsweep.log → its text: it may only grow)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_dir():
            out[rel] = "dir"
        elif p.name == "crabsweep.log":
            out[rel] = ("log", p.read_text(errors="replace"))
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def assert_unchanged(before: dict, after: dict) -> None:
    assert sorted(set(after) - set(before)) == [], "left behind"
    assert sorted(set(before) - set(after)) == [], "removed"
    for rel, old in before.items():
        new = after[rel]
        if isinstance(old, tuple):
            assert new[1].startswith(old[1]), f"{rel} was rewritten, not appended to"
        else:
            assert new == old, f"{rel} changed"


B = "bad config: "
# (id, argv built from the Box, a fragment the one line must hold)
CASES = [
    # --- types and ranges, refused when the config is composed ---------------------------------------------
    ("k.k=abc", lambda b: ["chain", *TINY, "k.k=abc", f"hydra.run.dir={b.run}"], B + "k.k='abc': Input should be a valid integer"),
    ("train.lr=abc", lambda b: ["round", *TINY, "train.lr=abc", f"hydra.run.dir={b.run}"], B + "train.lr='abc'"),
    ("train.lr=nan", lambda b: ["round", *TINY, "train.lr=nan", f"hydra.run.dir={b.run}"], B + "train.lr=nan"),
    ("train.lr=-1", lambda b: ["round", *TINY, "train.lr=-1", f"hydra.run.dir={b.run}"], "greater than 0"),
    ("train.lr_min>lr", lambda b: ["round", *TINY, "train.lr_min=1", f"hydra.run.dir={b.run}"], "must not exceed train.lr"),
    ("seed=abc", lambda b: ["round", *TINY, "seed=abc", f"hydra.run.dir={b.run}"], B + "seed='abc'"),
    ("seed=-1", lambda b: ["round", *TINY, "seed=-1", f"hydra.run.dir={b.run}"], B + "seed=-1"),
    ("chain.rounds=abc", lambda b: ["chain", *TINY, "chain.rounds=abc", f"hydra.run.dir={b.run}"], B + "chain.rounds='abc'"),
    ("chain.rounds=-1", lambda b: ["chain", *TINY, "chain.rounds=-1", f"hydra.run.dir={b.run}"], B + "chain.rounds=-1"),
    ("train.epochs=1.5", lambda b: ["round", *TINY, "train.epochs=1.5", f"hydra.run.dir={b.run}"], B + "train.epochs=1.5: Input should be a valid integer"),
    ("train.batch_size=true", lambda b: ["round", *TINY, "train.batch_size=true", f"hydra.run.dir={b.run}"], B + "train.batch_size=True"),
    ("round.top=-1", lambda b: ["round", *TINY, "round.top=-1", f"hydra.run.dir={b.run}"], B + "round.top=-1"),
    ("round.suppress layer 0.5", lambda b: ["round", *TINY, "round.suppress=[{layer: 0.5, index: 1}]", f"hydra.run.dir={b.run}"], B + "round.suppress.0.layer=0.5"),
    ("round.suppress out of range", lambda b: ["round", *TINY, "round.suppress=[{layer: 9, index: 0}]", f"hydra.run.dir={b.run}"], "(layer 9, index 0) is out of range"),
    ("chain.control=sometimes", lambda b: ["chain", *TINY, "chain.control=sometimes", f"hydra.run.dir={b.run}"], B + "chain.control='sometimes'"),
    ("chain.stop.top1_fraction=-1", lambda b: ["chain", *TINY, "chain.stop.top1_fraction=-1", f"hydra.run.dir={b.run}"], B + "chain.stop.top1_fraction=-1"),
    ("dtype=fp8", lambda b: ["round", *TINY, "dtype=fp8", f"hydra.run.dir={b.run}"], B + "dtype='fp8'"),
    ("device=quantum", lambda b: ["round", *TINY, "device=quantum", f"hydra.run.dir={b.run}"], "unknown device 'quantum'"),
    ("eval.max_new_tokens=-1", lambda b: ["round", *TINY, "eval.max_new_tokens=-1", f"hydra.run.dir={b.run}"], B + "eval.max_new_tokens=-1"),
    ("task.max_prompt_tokens=0", lambda b: ["round", *TINY, "task.max_prompt_tokens=0", f"hydra.run.dir={b.run}"], B + "task.max_prompt_tokens=0"),
    ("task.scorer.name=bogus", lambda b: ["round", *TINY, "task.scorer.name=bogus", f"hydra.run.dir={b.run}"], "unknown task scorer 'bogus'"),
    # --- unknown groups, options and keys --------------------------------------------------------------------
    ("unknown group foo=bar", lambda b: ["round", *TINY, "foo=bar", f"hydra.run.dir={b.run}"], "Could not override 'foo'"),
    ("unknown option model=nonexistent", lambda b: ["round", *TINY, "model=nonexistent", f"hydra.run.dir={b.run}"], "Could not find 'model/nonexistent'"),
    ("unknown key train.nonsense", lambda b: ["round", *TINY, "train.nonsense=1", f"hydra.run.dir={b.run}"], "use +train.nonsense=1"),
    ("appended key +train.nonsense", lambda b: ["round", *TINY, "+train.nonsense=1", f"hydra.run.dir={b.run}"], B + "train.nonsense=1: Extra inputs are not permitted"),
    ("appended key +k.kk", lambda b: ["chain", *TINY, "+k.kk=3", f"hydra.run.dir={b.run}"], B + "k.kk=3: Extra inputs are not permitted"),
    ("bad override syntax", lambda b: ["round", *TINY, "train.lr=[1,", f"hydra.run.dir={b.run}"], "bad config"),
    ("unknown command", lambda b: ["frobnicate"], "unknown command 'frobnicate'"),
    ("unknown flag", lambda b: ["round", "--frobnicate", *TINY, f"hydra.run.dir={b.run}"], "unrecognized arguments"),
    ("extra path", lambda b: ["chain", str(b.root / "x"), *TINY, f"hydra.run.dir={b.run}"], "chain takes no paths, not '"),
    ("two paths to report", lambda b: ["report", str(b.root), str(b.root)], "report takes <study dir>, not '"),
    ("--config-dir missing", lambda b: ["round", "--config-dir", str(b.root / "nope"), *TINY, f"hydra.run.dir={b.run}"], "is not a folder"),
    ("-m on report", lambda b: ["report", str(b.root), "-m"], "report does not take -m"),
    ("-m with one bad job", lambda b: ["chain", "-m", *CHAIN, "chain.rounds=0,abc", f"hydra.sweep.dir={b.root / 'multi'}"], B + "chain.rounds='abc'"),
    # --- K ------------------------------------------------------------------------------------------------------
    ("bad K k.k=0", lambda b: ["chain", *TINY, "k.k=0", f"hydra.run.dir={b.run}"], B + "k.k=0: Input should be greater than or equal to 1"),
    ("bad K fraction 1.5", lambda b: ["chain", *TINY, "k=fraction", "k.fraction=1.5", f"hydra.run.dir={b.run}"], B + "k.fraction=1.5"),
    ("bad K empty schedule", lambda b: ["chain", *TINY, "k=schedule", "k.per_round=[]", f"hydra.run.dir={b.run}"], B + "k.per_round"),
    ("impossible K", lambda b: ["chain", *TINY, "k.k=500", f"hydra.run.dir={b.run}"], "exceeds the 128 units available"),
    ("impossible K with inventory", lambda b: ["chain", *TINY, "k.k=60", "chain.rounds=2",
                                               f"chain.inventory={b.file('inv.json', [[0, i] for i in range(10)])}",
                                               f"hydra.run.dir={b.run}"], "exceeds the 128 units available"),
    # --- combinations ------------------------------------------------------------------------------------------
    ("lora_a_grad with adapter=full", lambda b: ["round", *TINY, "adapter=full", "attribution=lora_a_grad", f"hydra.run.dir={b.run}"], "attribution=lora_a_grad needs adapter=lora"),
    ("suppression.mode=bogus", lambda b: ["round", *TINY, "suppression.mode=bogus", f"hydra.run.dir={b.run}"], "suppression.mode"),
    # --- models ----------------------------------------------------------------------------------------------
    ("missing model package", lambda b: ["round", "model=smollm2_135m", "model.package=no-such-model-wheel", "task=tiny", "tracker=none",
                                         f"hydra.run.dir={b.run}"], "model package 'no-such-model-wheel' is not installed"),
    ("missing model module", lambda b: ["round", "model=gemma3_270m", "model.module=no_such_module_xyz", "task=tiny", "tracker=none",
                                        f"hydra.run.dir={b.run}"], "is not installed"),
    ("model.path missing", lambda b: ["round", "model=hf", f"model.path={b.root / 'missing'}", "task=tiny", "tracker=none",
                                      f"hydra.run.dir={b.run}"], "does not exist; pass model.path"),
    ("model.path empty folder", lambda b: ["round", "model=hf", f"model.path={b.file('empty/.keep', '').parent}", "task=tiny",
                                           "tracker=none", f"hydra.run.dir={b.run}"], "has no config.json"),
    ("model.path without config.json", lambda b: ["round", "model=hf", f"model.path={b.file('noconf/model.safetensors', b'x').parent}",
                                                  "task=tiny", "tracker=none", f"hydra.run.dir={b.run}"], "has no config.json"),
    ("model.path without tokenizer", lambda b: ["round", "model=hf", f"model.path={b.checkpoint(with_tokenizer=False)}", "task=tiny",
                                                "tracker=none", f"hydra.run.dir={b.run}"], "is not a loadable transformers checkpoint"),
    ("model.path truncated weights", lambda b: ["round", "model=hf", "task=tiny", "tracker=none", f"hydra.run.dir={b.run}",
                                                f"model.path={b.truncate(b.checkpoint() / 'model.safetensors').parent}"],
     "is not a loadable transformers checkpoint"),
    ("model.path malformed config.json", lambda b: ["round", "model=hf", f"model.path={b.checkpoint({'config.json': '{oops'})}",
                                                    "task=tiny", "tracker=none", f"hydra.run.dir={b.run}"],
     "is not a loadable transformers checkpoint"),
    ("model.path non-UTF-8 config.json", lambda b: ["round", "model=hf", f"model.path={b.checkpoint({'config.json': NON_UTF8_CONFIG})}",
                                                    "task=tiny", "tracker=none", f"hydra.run.dir={b.run}"],
     "is not a loadable transformers checkpoint"),
    ("unsupported architecture", lambda b: ["round", "model=hf", f"model.path={b.checkpoint(model_type='gpt2')}", "task=tiny",
                                            "tracker=none", f"hydra.run.dir={b.run}"], "unsupported architecture 'gpt2'"),
    # --- task files -----------------------------------------------------------------------------------------
    ("task malformed JSON", lambda b: ["round", *TINY, f"task.path={b.task(MALFORMED_TASK)}", f"hydra.run.dir={b.run}"], "bad.json: malformed JSON at line 1"),
    ("task non-UTF-8", lambda b: ["round", *TINY, f"task.path={b.task(LATIN1_TASK)}", f"hydra.run.dir={b.run}"], "bad.json: not UTF-8 text"),
    ("task missing output", lambda b: ["round", *TINY, f"task.path={b.task({'input': 'a'})}", f"hydra.run.dir={b.run}"], "missing or empty 'output'"),
    ("task weights.conclusion a number", lambda b: ["round", *TINY, f"task.path={b.task({'input': 'a', 'output': 'b 5', 'weights': {'conclusion': 5}})}",
                                                    f"hydra.run.dir={b.run}"], "weights.conclusion must be a list of non-empty strings"),
    ("task weights.conclusion a string", lambda b: ["round", *TINY, f"task.path={b.task({'input': 'a', 'output': 'b yes', 'weights': {'conclusion': 'yes'}})}",
                                                    f"hydra.run.dir={b.run}"], "weights.conclusion must be a list of non-empty strings"),
    ("task conclusion not in output", lambda b: ["round", *TINY, f"task.path={b.task({'input': 'a', 'output': 'b', 'weights': {'glue': ['nope']}})}",
                                                 f"hydra.run.dir={b.run}"], "glue string 'nope' does not occur"),
    ("task split bogus", lambda b: ["round", *TINY, f"task.path={b.task({'input': 'a', 'output': 'b', 'split': 'test'})}", f"hydra.run.dir={b.run}"], "split 'test'"),
    ("task sample not an object", lambda b: ["round", *TINY, f"task.path={b.task([3])}", f"hydra.run.dir={b.run}"], "a sample must be a JSON object"),
    ("task top-level a string", lambda b: ["round", *TINY, f"task.path={b.task(STRING_TASK)}", f"hydra.run.dir={b.run}"], "expected a sample object"),
    ("task duplicate ids", lambda b: ["round", *TINY, f"task.path={b.task([{'id': 'x', 'input': 'a', 'output': 'b'}] * 2)}", f"hydra.run.dir={b.run}"], "duplicate sample ids"),
    ("task path missing", lambda b: ["round", *TINY, f"task.path={b.root / 'nope'}", f"hydra.run.dir={b.run}"], "does not exist"),
    ("task folder empty", lambda b: ["round", *TINY, f"task.path={b.file('t/readme.txt', 'x').parent}", f"hydra.run.dir={b.run}"], "holds no .json files"),
    ("task.heldout unknown id", lambda b: ["round", *TINY, "task.heldout=[nope]", f"hydra.run.dir={b.run}"], "task.heldout names unknown sample ids"),
    ("collateral file non-UTF-8", lambda b: ["chain", *CHAIN, f"eval.collateral_path={b.file('gen.json', LATIN1_TEXTS)}",
                                             f"hydra.run.dir={b.run}"], "gen.json: expected UTF-8 JSON"),
    # --- inventory (unit set) files ----------------------------------------------------------------------------
    ("inventory missing", lambda b: ["chain", *CHAIN, f"chain.inventory={b.root / 'nope.json'}", f"hydra.run.dir={b.run}"], "does not exist"),
    ("inventory non-UTF-8", lambda b: ["chain", *CHAIN, f"chain.inventory={b.file('inv.json', LATIN1_UNITS)}", f"hydra.run.dir={b.run}"], "inv.json: not UTF-8 text"),
    ("inventory malformed JSON", lambda b: ["chain", *CHAIN, f"chain.inventory={b.file('inv.json', '[[0, 1]')}", f"hydra.run.dir={b.run}"], "inv.json: malformed JSON"),
    ("inventory layer 0.7", lambda b: ["chain", *CHAIN, f"chain.inventory={b.file('inv.json', [{'layer': 0.7, 'index': 1}])}", f"hydra.run.dir={b.run}"],
     "layer and index must be integers"),
    ("inventory layer true", lambda b: ["chain", *CHAIN, f"chain.inventory={b.file('inv.json', [{'layer': True, 'index': 1}])}", f"hydra.run.dir={b.run}"],
     "layer and index must be integers"),
    ("inventory out of range", lambda b: ["chain", *CHAIN, f"chain.inventory={b.file('inv.json', [{'layer': 0, 'index': 999}])}", f"hydra.run.dir={b.run}"],
     "(layer 0, index 999) is out of range"),
    ("inventory not a list", lambda b: ["chain", *CHAIN, f"chain.inventory={b.file('inv.json', {'units': 3})}", f"hydra.run.dir={b.run}"], "expected units"),
    ("inventory bad Circuit key", lambda b: ["chain", *CHAIN, f"chain.inventory={b.file('inv.json', {'neurons': {'0,x': 1.0}})}", f"hydra.run.dir={b.run}"], "expected units"),
    # --- run folders -----------------------------------------------------------------------------------------
    ("hydra.run.dir is a file", lambda b: ["round", *TINY, f"hydra.run.dir={b.file('afile', 'keep me')}"], "is a file"),
    ("hydra.run.dir under a file", lambda b: ["round", *TINY, f"hydra.run.dir={b.file('afile', 'keep me') / 'run'}"], "cannot create hydra.run.dir"),
    ("hydra.run.dir unwritable parent", lambda b: ["round", *TINY, f"hydra.run.dir={b.immutable('ro') / 'run'}"], "cannot create hydra.run.dir"),
    ("hydra.run.dir unwritable itself", lambda b: ["chain", *CHAIN, f"hydra.run.dir={b.immutable('ro')}"], "cannot write in hydra.run.dir"),
    ("hydra.run.dir in /proc", lambda b: ["round", *TINY, "hydra.run.dir=/proc/crabsweep-run"], "cannot create hydra.run.dir"),
    ("hydra.run.dir of someone else's files", lambda b: ["chain", *CHAIN, f"hydra.run.dir={b.file('mine/notes.txt', 'mine').parent}"],
     "already holds files; pass a new or empty folder"),
    ("round into an earlier run", lambda b: ["round", *TINY, f"hydra.run.dir={b.chain()}"], "already holds an earlier run"),
    ("failure in an existing empty folder", lambda b: ["chain", *CHAIN, f"task.path={b.root / 'nope'}", f"hydra.run.dir={b.folder('empty')}"],
     "does not exist"),
    ("failure in the default run folder", lambda b: ["chain", *CHAIN, f"task.path={b.root / 'nope'}"], "does not exist"),
    ("resume with another config", lambda b: ["chain", *CHAIN, "k.k=3", f"hydra.run.dir={b.chain()}"], "holds a different config (k.k: 2 != 3)"),
    ("resume with a truncated record.json", lambda b: ["chain", *CHAIN, f"hydra.run.dir={b.damaged('round_1/record.json')}"],
     "record.json is damaged"),
    ("resume with a damaged saved config", lambda b: ["chain", *CHAIN, f"hydra.run.dir={b.damaged('.hydra/config.yaml', LATIN1_YAML)}"],
     "is not a readable config"),
    # --- NaN -----------------------------------------------------------------------------------------------
    ("training NaN train.lr=1e30", lambda b: ["chain", *CHAIN, "train.lr=1e30", f"hydra.run.dir={b.run}"], "lower train.lr"),
    # --- ensemble -----------------------------------------------------------------------------------------
    ("ensemble.weights=[a,b,c]", lambda b: ["ensemble", str(b.chain()), *TINY, "ensemble.weights=[a,b,c]"], B + "ensemble.weights.0='a'"),
    ("ensemble.weights=[nan,1]", lambda b: ["ensemble", str(b.chain()), *TINY, "ensemble.weights=[nan,1]"], B + "ensemble.weights.0=nan: Input should be a finite number"),
    ("ensemble.weights=[1,inf]", lambda b: ["ensemble", str(b.chain()), *TINY, "ensemble.weights=[1,inf]"], B + "ensemble.weights.1=inf: Input should be a finite number"),
    ("ensemble.weights count", lambda b: ["ensemble", str(b.chain()), *TINY, "ensemble.weights=[1,1,1]"], "has 3 values for 2 rounds"),
    ("ensemble.weights negative on the simplex", lambda b: ["ensemble", str(b.chain()), *TINY, "ensemble.weights=[-1,1]"], "negative values"),
    ("ensemble.weights zero sum", lambda b: ["ensemble", str(b.chain()), *TINY, "ensemble.weights=[0,0]"], "sum to 0"),
    ("ensemble.rounds unknown", lambda b: ["ensemble", str(b.chain()), *TINY, "ensemble.rounds=[7]"], "names rounds [7]"),
    ("ensemble.combination bogus", lambda b: ["ensemble", str(b.chain()), *TINY, "ensemble.combination=bogus"], B + "ensemble.combination='bogus'"),
    ("ensemble.suppression bogus", lambda b: ["ensemble", str(b.chain()), *TINY, "ensemble.suppression=round:9"], "ensemble.suppression=round:9"),
    ("ensemble.objective.direction", lambda b: ["ensemble", str(b.chain()), *TINY, "ensemble.objective.direction=up"], B + "ensemble.objective.direction='up'"),
    ("ensemble.save=<chain dir>", lambda b: ["ensemble", str(b.chain()), *TINY, f"ensemble.save={b.chain()}"], "already exists"),
    ("ensemble.save=<existing folder>", lambda b: ["ensemble", str(b.chain()), *TINY, f"ensemble.save={b.file('mine/notes.txt', 'mine').parent}"], "already exists"),
    ("ensemble.save=<existing file>", lambda b: ["ensemble", str(b.chain()), *TINY, f"ensemble.save={b.file('mine.txt', 'mine')}"], "already exists"),
    ("ensemble.save under a file", lambda b: ["ensemble", str(b.chain()), *TINY, f"ensemble.save={b.file('mine.txt', 'mine') / 'ens'}"], "ensemble.save"),
    ("ensemble.save unwritable", lambda b: ["ensemble", str(b.chain()), *TINY, f"ensemble.save={b.immutable('ro') / 'ens'}"], "ensemble.save"),
    ("ensemble missing chain", lambda b: ["ensemble", str(b.root / "nope"), *TINY], "does not exist"),
    ("ensemble folder without adapters", lambda b: ["ensemble", str(b.file("x/a.txt", "a").parent), *TINY], "holds no round_<r>/adapter"),
    ("ensemble truncated record.json", lambda b: ["ensemble", str(b.damaged("round_0/record.json")), *TINY], "record.json is damaged"),
    ("ensemble truncated adapter weights", lambda b: ["ensemble", str(b.damaged("round_1/adapter/adapter_model.safetensors")), *TINY],
     "round_1/adapter is damaged (SafetensorError"),
    ("ensemble damaged adapter_config.json", lambda b: ["ensemble", str(b.damaged("round_1/adapter/adapter_config.json")), *TINY],
     "round_1/adapter is damaged (JSONDecodeError"),
    ("ensemble damaged chain.json", lambda b: ["ensemble", str(b.damaged("chain.json")), *TINY], "chain.json is damaged"),
    # --- reproduce -----------------------------------------------------------------------------------------
    ("reproduce A A", lambda b: ["reproduce", str(b.chain()), str(b.chain())], "would write over the run it checks"),
    ("reproduce A A/.", lambda b: ["reproduce", str(b.chain()), str(b.chain() / ".")], "would write over the run it checks"),
    ("reproduce A A/..", lambda b: ["reproduce", str(b.chain()), str(b.chain() / "..")], "would write over the run it checks"),
    ("reproduce into a round of A", lambda b: ["reproduce", str(b.chain()), str(b.chain() / "round_0")], "is not empty"),
    ("reproduce into a non-empty folder", lambda b: ["reproduce", str(b.chain()), str(b.file("out/mine.txt", "mine").parent)], "is not empty"),
    ("reproduce into a file", lambda b: ["reproduce", str(b.chain()), str(b.file("out.txt", "mine"))], "already exists"),
    ("reproduce a missing run", lambda b: ["reproduce", str(b.root / "nope"), str(b.root / "out")], "holds no chain.json"),
    ("reproduce truncated record.json", lambda b: ["reproduce", str(b.damaged("round_1/record.json")), str(b.root / "out")],
     "record.json is damaged"),
    ("reproduce truncated chain.json", lambda b: ["reproduce", str(b.damaged("chain.json")), str(b.root / "out")], "chain.json is damaged"),
    ("reproduce invalid saved config", lambda b: ["reproduce", str(b.damaged(".hydra/config.yaml", b"train: {lr: abc}")), str(b.root / "out")],
     "bad config"),
    ("reproduce unwritable out", lambda b: ["reproduce", str(b.chain()), str(b.immutable("ro") / "out")], "cannot create the rerun's folder"),
    # --- sweep (input checks; the sweep's run-time checks are tested with the sweep) ---------------------------
    ("sweep.objective.direction=sideways", lambda b: ["sweep", *TINY, "sweep.objective.direction=sideways"], B + "sweep.objective.direction='sideways'"),
    ("sweep.workers=abc", lambda b: ["sweep", *TINY, "sweep.workers=abc"], B + "sweep.workers='abc': use a positive number of workers or auto"),
    ("sweep.workers=0", lambda b: ["sweep", *TINY, "sweep.workers=0"], B + "sweep.workers=0: use a positive number of workers or auto"),
    ("sweep.n_trials=0", lambda b: ["sweep", *TINY, "sweep.n_trials=0"], B + "sweep.n_trials=0"),
    ("sweep percentile 150", lambda b: ["sweep", *TINY, "sweep.pruner.name=percentile", "+sweep.pruner.percentile=150"], B + "sweep.pruner.percentile=150"),
    ("sweep.study=../../x", lambda b: ["sweep", *TINY, "sweep.study=../../x"], B + "sweep.study='../../x'"),
    ("sweep.study=null", lambda b: ["sweep", *TINY, "sweep.study=null"], B + "sweep.study=None"),
    ("sweep.sampler.name=bogus", lambda b: ["sweep", *TINY, "sweep.sampler.name=bogus"], "unknown sampler 'bogus'"),
    ("sweep.pruner.name=bogus", lambda b: ["sweep", *TINY, "sweep.pruner.name=bogus"], "unknown pruner 'bogus'"),
    ("sweep.params bad type", lambda b: ["sweep", *TINY, "sweep.params.train.lr={type: gaussian}"], "sweep.params.train.lr"),
    # --- report ----------------------------------------------------------------------------------------------
    ("report a missing folder", lambda b: ["report", str(b.root / "nope")], "holds no sweep.json"),
    ("report on a chain", lambda b: ["report", str(b.chain())], "holds no sweep.json"),
    ("report truncated sweep.json", lambda b: ["report", str(b.file("study/sweep.json", '{"study": "x", "stor').parent)], "sweep.json is damaged"),
    ("report no path", lambda b: ["report"], "report takes"),
]


@pytest.mark.parametrize("build, match", [pytest.param(b, m, id=i) for i, b, m in CASES])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(build, match, finished_chain, tmp_path, monkeypatch, capsys):
    box = Box(tmp_path, finished_chain)
    monkeypatch.chdir(tmp_path)                  # default run folders land in the case's folder
    try:
        argv = build(box)
        before = snapshot(tmp_path)
        capsys.readouterr()
        code = main(argv)
        err = capsys.readouterr().err
        after = snapshot(tmp_path)
    finally:
        box.release()
    lines = [line for line in err.splitlines() if line.strip() and not re.match(r"\d\d:\d\d:\d\d INFO ", line)]
    assert code == 2, err
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith("crabsweep: error: ") and match in lines[0], err
    assert_unchanged(before, after)


def test_the_table_has_at_least_40_distinct_cases():
    ids = [i for i, _, _ in CASES]
    assert len(ids) == len(set(ids)) >= 40
