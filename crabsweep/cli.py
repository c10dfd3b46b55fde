"""`crabsweep <command> [paths] [group=option key=value …] [Hydra flags]` — a thin shell over the API.

Every command composes the same Hydra config (`crabsweep/conf`) and calls the library; Hydra's own
flags work as Hydra users expect: `--help`, `--cfg job|hydra|all [--resolve] [--package P]` (print the
composed config; nothing runs, nothing is written), `--info`, `--config-dir DIR`, `--shell-completion`,
and `-m/--multirun` (the cross product of comma-separated values, run one after another in this process
with the model loaded once; each job in `<hydra.sweep.dir>/<n>`).

Any problem in the user's input is one line on stderr and exit code 2.
"""

from __future__ import annotations

import logging
import signal
import sys
from .errors import UserError

log = logging.getLogger("crabsweep")


def _commands() -> dict:
    from .commands import COMMANDS
    return COMMANDS


def _usage() -> str:
    lines = ["usage: crabsweep <command> [paths] [group=option key=value ...] [--help | --cfg job | -m ...]", "",
             "commands:"]
    lines += [f"  {name:<12} {c.summary}" for name, c in _commands().items()]
    lines += ["", "config groups (group=option):"]
    from .config import group_options
    lines += [f"  {g:<12} {', '.join(opts)}" for g, opts in group_options().items()]
    lines += ["", "`crabsweep <command> --help` for a command; `--cfg job` prints the composed config."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    if argv is None and hasattr(signal, "SIGPIPE"):
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)      # `crabsweep … | head` ends quietly
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if not argv or argv[0] in ("-h", "--help", "help"):
            print(_usage())
            return 0 if argv else 2
        if argv[0] in ("-sc", "--shell-completion"):
            from .config import shell_completion
            shell_completion(argv[1:])
            return 0
        commands = _commands()
        name, rest = argv[0], argv[1:]
        if name not in commands:
            raise UserError(f"unknown command '{name}'; choose one of {', '.join(commands)} (crabsweep --help)")
        return commands[name].run(name, rest)
    except UserError as e:
        logging.getLogger("crabsweep").handlers.clear()
        print(f"crabsweep: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("crabsweep: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
