"""`crabsweep repl`: explore circuits on a loaded model, interactively or from a script on stdin.

    circuit> prompt The capital of France is        # set the prompt (raw text; `chat on` for the template)
    circuit> discover " Paris"                        # RelP circuit for a target (quotes keep the space);
    circuit> discover                                 #   no target: the model's top-1 next token
    circuit> top 5                                    # next-token probabilities (circuit × multiplier)
    circuit> ablate top10 | ablate L11/N1229 | ablate all
    circuit> amplify top20 3                          # scale by 3 (default 2)
    circuit> sweep 0 0.5 1 2                          # one generation and target probability per multiplier
    circuit> multiplier 0                             # the multiplier `top` uses
    circuit> edges 20                                 # edge graph of the circuit's top 20 targets
    circuit> save runs/paris.json | load runs/paris.json | info | quit

`echo "prompt The capital of France is\\ndiscover\\nablate top10" | crabsweep repl tracker=none` runs a script.
Errors print one line and the loop goes on. `save` never overwrites a file it did not write itself.
"""

from __future__ import annotations

import cmd
import shlex
import sys
from pathlib import Path

import torch

from ..core.basis import Unit
from ..core.interventions import Scale
from ..errors import UserError
from ..loop.metrics import generate_ids
from .circuit import Circuit, load_source
from .config import options
from .discover import discover
from .prompts import PromptSet, encode


class Repl(cmd.Cmd):
    prompt = "circuit> "
    intro = "crabsweep circuit explorer: `help` lists the commands, `quit` leaves."

    def __init__(self, session, stdin=None, stdout=None):
        stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
        super().__init__(stdin=stdin, stdout=stdout)
        self.use_rawinput = stdin is sys.stdin and stdin.isatty()
        self.echo = not (hasattr(stdin, "isatty") and stdin.isatty())
        self.session = session
        ccfg = options(session.cfg, "circuit")
        self.chat = bool(ccfg.chat)
        self.max_new = options(session.cfg, "steer").max_new_tokens
        self.text: str | None = None
        self.target: str | None = None
        self.circuit: Circuit | None = None
        self.multiplier = 1.0
        self.written: set[Path] = set()

    # -- plumbing -------------------------------------------------------------------------------------
    def say(self, line: str = "") -> None:
        self.stdout.write(line + "\n")

    def precmd(self, line):
        if self.echo and line != "EOF":
            self.say(line)
        return line

    def onecmd(self, line):
        try:
            return super().onecmd(line)
        except UserError as e:
            self.say(f"error: {e}")
        except Exception as e:  # noqa: BLE001 — an exploration loop reports and carries on
            self.say(f"error: {type(e).__name__}: {e}")
        return False

    def default(self, line):
        self.say(f"error: unknown command {line.split()[0]!r}; `help` lists the commands")

    def emptyline(self):
        return False

    def _ids(self) -> torch.Tensor:
        if self.text is None:
            raise UserError("no prompt yet; `prompt <text>` first")
        return encode(self.session, [self.text], self.chat)[0]

    def _units(self, spec: str) -> list[Unit]:
        spec = spec.strip()
        if spec.upper().startswith("L") and ("/" in spec or ":" in spec):
            layer, index = spec[1:].replace("/N", ":").replace("/", ":").split(":")
            return self.session.basis.check([(int(layer), int(index))], "unit")
        if self.circuit is None:
            raise UserError("no circuit yet; `discover` or `load` one (or name a unit as L<layer>/N<index>)")
        units = self.circuit.units()
        if spec.startswith("top"):
            return units[:int(spec[3:] or 10)]
        if spec in ("", "all"):
            return units
        raise UserError(f"unit spec {spec!r}: use L<layer>/N<index>, top<N> or all")

    def _generate(self, ivs) -> str:
        s = self.session
        from ..core.observers import prompt_examples
        ex = prompt_examples(s, [self.text], self.chat)[0]
        with s.adapter.disabled(), s.intervene(*ivs):
            ids = generate_ids(s, [ex], self.max_new)[0]
        return s.tokenizer.decode(ids, skip_special_tokens=True)

    @torch.no_grad()
    def _probs(self, ivs) -> torch.Tensor:
        s = self.session
        with s.adapter.disabled(), s.intervene(*ivs), s.precision():
            return s.model(input_ids=self._ids()[None].to(s.device)).logits[0, -1].float().softmax(-1).cpu()

    def _steer(self, spec: str, m: float) -> None:
        units = self._units(spec)
        self.say(f"{len(units)} units × {m:g}: {self._generate([Scale(tuple(units), m)])!r}")

    # -- commands -------------------------------------------------------------------------------------
    def do_prompt(self, arg):
        """prompt <text>: set the prompt and show the model's greedy continuation (no argument: show it)."""
        if not arg:
            self.say(f"prompt: {self.text!r} (chat {'on' if self.chat else 'off'})")
            return
        self.text, self.circuit = arg, None
        self.say(f"→ {self._generate([])!r}")

    def do_chat(self, arg):
        """chat on|off: format prompts with the chat template or as raw text."""
        self.chat = arg.strip().lower() in ("on", "true", "1", "yes")
        self.say(f"chat template {'on' if self.chat else 'off'}")

    def do_discover(self, arg):
        """discover [target]: RelP circuit of the prompt for `target` (quote it to keep a leading space;
        none: the top-1 next token), selected by the `discover` config."""
        self._ids()
        words = shlex.split(arg) if arg.strip() else []
        if words:
            target = words[0]
        else:
            target = self.session.tokenizer.decode([int(self._probs([]).argmax())])
        found = discover(self.session, prompts=PromptSet("repl", chat=self.chat), prompt=self.text, target=target,
                         method="relp")
        self.circuit, self.target = found.circuit, target
        c = found.circuit
        self.say(f"target {target!r} vs {c.meta['counterfactuals'][0]!r}: metric {c.total_logit_diff:.3f}; "
                 f"{len(c)} entries, {len(c.units())} units")
        for (g, p, i), v in c.top(10):
            self.say(f"  L{g}/N{i} (pos {p})  {v:+.4f}")

    def do_ablate(self, arg):
        """ablate [L<l>/N<n> | top<N> | all]: generate with those units × 0."""
        self._ids()
        self._steer(arg, 0.0)

    def do_amplify(self, arg):
        """amplify [spec] [multiplier]: generate with those units × multiplier (default 2)."""
        self._ids()
        words, m, spec = arg.split(), 2.0, ""
        for w in words:
            try:
                m = float(w)
            except ValueError:
                spec = w
        self._steer(spec, m)

    def do_sweep(self, arg):
        """sweep [m1 m2 …]: one generation per multiplier of the whole circuit (default 0 0.5 1 1.5 2)."""
        self._ids()
        ms = [float(x) for x in arg.split()] or [0.0, 0.5, 1.0, 1.5, 2.0]
        units = self._units("all")
        tid = self.session.tokenizer.encode(self.target, add_special_tokens=False)[0] if self.target else None
        for m in ms:
            ivs = [Scale(tuple(units), m)]
            p = f"p(target) {float(self._probs(ivs)[tid]):.4f}  " if tid is not None else ""
            self.say(f"m={m:g}: {p}{self._generate(ivs)!r}")

    def do_top(self, arg):
        """top [k]: the k most likely next tokens (with the circuit × the current multiplier)."""
        ivs = [Scale(tuple(self.circuit.units()), self.multiplier)] if self.circuit is not None else []
        probs = self._probs(ivs)
        values, ids = probs.topk(int(arg or 10))
        for v, i in zip(values.tolist(), ids.tolist()):
            self.say(f"  {self.session.tokenizer.decode([i])!r:>16} {v:.4f} {'#' * int(40 * v)}")

    def do_multiplier(self, arg):
        """multiplier [m]: show or set the multiplier `top` uses."""
        if arg.strip():
            self.multiplier = float(arg)
        self.say(f"multiplier {self.multiplier:g}")

    def do_edges(self, arg):
        """edges [k]: the edge graph of the circuit's top-k targets (default edges.targets)."""
        if self.circuit is None:
            raise UserError("no circuit yet; `discover` or `load` one")
        from .edges import edges
        graph = edges(self.session, self.circuit, **({"targets": int(arg)} if arg.strip() else {}))
        self.say(f"{len(graph.edges)} edges")
        for s, t, w in graph.edges[:10]:
            self.say(f"  L{s[0]}/N{s[2]}@{s[1]} → L{t[0]}/N{t[2]}@{t[1]}  {w:+.4f}")
        for h in graph.hubs(5)["sources"]:
            self.say(f"  hub L{h['unit'][0]}/N{h['unit'][1]}: {h['degree']} targets, Σ|w| {h['weight']:.3f}")

    def do_save(self, arg):
        """save <path.json>: write the circuit (the reference's format; never over a file this session did not write)."""
        if self.circuit is None:
            raise UserError("no circuit to save")
        path = Path(arg.strip() or "circuit.json").expanduser()
        if path.exists() and path.resolve() not in self.written:
            raise UserError(f"{path} exists; choose a new file name")
        self.circuit.save(path)
        self.written.add(path.resolve())
        self.say(f"saved {len(self.circuit)} entries to {path}")

    def do_load(self, arg):
        """load <path>: a circuit JSON, units.json, or chain folder; its prompt becomes the prompt if it has one."""
        self.circuit = load_source(arg.strip(), self.session.basis)
        self.session.basis.check(self.circuit.units(), "circuit unit")
        prompts = self.circuit.meta.get("prompts") or []
        if len(prompts) == 1:
            self.text, self.chat = prompts[0], bool(self.circuit.meta.get("chat", self.chat))
            targets = self.circuit.meta.get("targets") or [None]
            self.target = targets[0]
        self.say(f"loaded {len(self.circuit)} entries ({len(self.circuit.units())} units)")

    def do_info(self, arg):
        """info: the prompt, circuit, target and multiplier."""
        self.say(f"prompt {self.text!r} (chat {'on' if self.chat else 'off'}); target {self.target!r}; "
                 f"circuit {len(self.circuit) if self.circuit else 0} entries; multiplier {self.multiplier:g}")

    def do_quit(self, arg):
        """quit: leave."""
        return True

    do_exit = do_quit

    def do_EOF(self, arg):  # noqa: N802 — cmd's name for end of input
        return True


def repl(session, stdin=None, stdout=None) -> None:
    """Run the explorer on `session` until `quit` or the end of `stdin`."""
    Repl(session, stdin, stdout).cmdloop()
