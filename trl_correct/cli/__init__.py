"""`trl-correct` console script.

    trl-correct train --config recipes/tiny.yaml [--field value ...]   # the main job, in this process
    trl-correct doctor --config RECIPE [--json OUT] [--plot OUT.png] [--inject FAULT ...] [--selftest]
    trl-correct plot RUN_DIR [--out PNG]                               # reward and mismatch curves of a run
    trl-correct verify PATH [--config RECIPE] [--field value ...]      # re-check a saved model's parity certificate
                                                                       # (exit 0 holds, 1 does not, 2 no certificate)
    trl-correct build-tiny                                             # build/cache the embedded model, print its dir

Exit codes of every command: 0 done; 2 what was given cannot be used (a path, the recipe, a field's value, the
dataset, the model, a reward, a checkpoint, output_dir): one line on stderr naming it, what was found and the fix;
1 the gate failed (its report on stderr; verify: the certificate does not hold; doctor: see its help). A traceback
only for a bug, or with --debug (a bare flag, anywhere) or TRL_CORRECT_DEBUG=1.
"""

import argparse
import os
import sys

from ..errors import EXIT_GATE_FAILED, EXIT_USER_ERROR, ConfigError, RecipeError, UserError, did_you_mean, one_line

USAGE = __doc__
COMMANDS = ("train", "doctor", "plot", "verify", "build-tiny")
DEBUG_ENV = "TRL_CORRECT_DEBUG"


def debug_requested(argv: list[str]) -> tuple[bool, list[str]]:
    """(whether a traceback was asked for, argv without the bare --debug flag). `--debug X` with a value is left:
    it is transformers' TrainingArguments.debug (which always takes one)."""
    out, flag = [], False
    for i, a in enumerate(argv):
        if a == "--debug" and (i + 1 == len(argv) or argv[i + 1].startswith("-")):
            flag = True
            continue
        out.append(a)
    env = os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")
    return flag or env, out


def guarded(prog: str, fn, argv: list[str]) -> int:
    """Run `fn(argv)` as command `prog`: its int result is the exit code (None: 0). A UserError is one line on stderr
    and exit 2, a GateFailure its report on stderr and exit 1; with --debug / TRL_CORRECT_DEBUG=1 both re-raise (the
    traceback, with the cause chained). Anything else is a bug and keeps its traceback."""
    from ..core.checks import GateFailure

    debug, argv = debug_requested(list(argv))
    try:
        code = fn(argv)
    except UserError as e:
        if debug:
            raise
        print(f"{prog}: {one_line(e)}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    except GateFailure as e:
        if debug:
            raise
        print(f"{prog}: {e}", file=sys.stderr, flush=True)
        return EXIT_GATE_FAILED
    return code if isinstance(code, int) and not isinstance(code, bool) else 0


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its errors as one line (errors.ConfigError: invalid choices with the closest one, unknown
    options with the closest known) instead of the usage and `error:`; --help unchanged."""

    def add_argument(self, *names, **kwargs):
        self.options = [*getattr(self, "options", []), *(n.lstrip("-") for n in names if n.startswith("-"))]
        return super().add_argument(*names, **kwargs)

    def error(self, message):
        from .train import argparse_words

        if message.startswith("unrecognized arguments:"):
            words = message.split(":", 1)[1].split()
            flag = next((w for w in words if w.startswith("--")), words[0] if words else "")
            options = getattr(self, "options", [])
            raise RecipeError(f"unknown option {flag}{did_you_mean(flag.lstrip('-'), options)}; see {self.prog} "
                              "--help")
        raise ConfigError(argparse_words(message))


def _train(argv):
    from .train import run

    run(argv)
    return 0


def _doctor(argv):
    from .doctor import main

    return main(argv)


def _plot(argv):
    from .plot import main

    return main(argv)


def _verify(argv):
    from .verify import main

    return main(argv)


def _build_tiny(argv):
    from ..tasks.tiny import tiny_model_dir

    print(tiny_model_dir())
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    cmd, rest = argv[0], argv[1:]
    run = {"train": _train, "doctor": _doctor, "plot": _plot, "verify": _verify, "build-tiny": _build_tiny}.get(cmd)
    if run is None:
        print(f"trl-correct: unknown command {cmd!r}{did_you_mean(cmd, COMMANDS)}; commands: {', '.join(COMMANDS)} "
              "(trl-correct --help)", file=sys.stderr)
        return EXIT_USER_ERROR
    return guarded(f"trl-correct {cmd}", run, rest)


if __name__ == "__main__":
    sys.exit(main())
