"""`trl-correct` console script.

    trl-correct train --config recipes/tiny.yaml [--field value ...]   # the main job, in this process
    trl-correct doctor --config RECIPE [--json OUT] [--plot OUT.png] [--inject FAULT ...] [--selftest]
    trl-correct plot RUN_DIR [--out PNG]                               # reward and mismatch curves of a run
    trl-correct verify PATH [--config RECIPE] [--field value ...]      # re-check a saved model's parity certificate
                                                                       # (exit 0 holds, 1 does not, 2 no certificate)
    trl-correct build-tiny                                             # build/cache the embedded model, print its dir
"""

import sys

USAGE = __doc__


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "train":
        from .train import main as train

        train(rest)
        return 0
    if cmd == "doctor":
        from .doctor import main as doctor

        return doctor(rest)
    if cmd == "plot":
        from .plot import main as plot

        return plot(rest)
    if cmd == "verify":
        from .verify import main as verify

        return verify(rest)
    if cmd == "build-tiny":
        from ..tasks.tiny import tiny_model_dir

        print(tiny_model_dir())
        return 0
    print(f"trl-correct: unknown command {cmd!r}\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
