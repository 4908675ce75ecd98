"""`trl-correct doctor`: show, by ablation, why this recipe's trainer/engine pair can or cannot be trusted, and prove
on this machine that the gate catches every known fault.

    trl-correct doctor --config RECIPE [--json OUT] [--plot OUT.png] [--inject FAULT ...] [--selftest] [recipe flags]
    trl-correct doctor --config RECIPE --calibrate [--yaml OUT.yaml] [recipe flags]

Builds the recipe's trainer and engine (no training), runs the gate clean, then once per ablated setting (each known
fault of faults.py, plus async scheduling on), and prints one table. With --inject the report is the gate with those
faults present. With --selftest every fault must be detected with its own cause (--selftest --inject F ...: only those
faults, each ablated alone). Exit code: 0 when the reported gate passes (--inject: when it fails with every injected
fault's cause named; --selftest: clean passes and every applicable fault is detected with the right cause), 1
otherwise.

--calibrate (doctor_calibrate.py): measures the noise floors on this model and machine (the trainer against itself and,
in bf16/fp16, against fp32 — what the gate calibrates from — plus the engine against itself across batch
compositions), prints the thresholds derived from them, injects every fault that moves the probe and prints its
margin over those thresholds next to its margin over the fixed per-dtype values, and writes a recipe snippet (YAML)
that pins the thresholds. Exit code 0 when the clean gate passes and every applicable fault is named.
"""

import argparse
import json
import sys

from . import ArgumentParser, guarded
from ..testing.faults import FAULTS, run_with_faults
from ..core.numerics import MISMATCH_KEYS

MISMATCH_OUT = [k for k in MISMATCH_KEYS if k != "n_nonfinite"]


def _row(setting: str, run, note: str = "") -> dict:
    report, gaps = run.report, run.probe.gaps if run.probe is not None else None
    m = report.mismatch
    row = {"setting": setting, **{k: m.get(k) for k in MISMATCH_OUT},
           "verdict": "pass" if report.passed else "fail", "causes": report.causes}
    if note:
        row["note"] = note
    row["_gaps"] = gaps
    return row


def _blank_row(setting: str, verdict: str, note: str) -> dict:
    """A row for a setting that could not be measured here."""
    return {"setting": setting, **{k: None for k in MISMATCH_OUT}, "verdict": verdict, "causes": [], "note": note,
            "_gaps": None}


def _floor_row(run) -> dict:
    """The trainer against itself (its probe batch scored whole vs one sequence at a time): the floor under every
    engine comparison above."""
    sc = run.floors["trainer_vs_itself"]
    check = run.report.check("trainer_consistency")
    return {"setting": "trainer vs itself (batch vs 1)", **{k: sc.get(k) for k in MISMATCH_OUT},
            "verdict": "pass" if check.passed else "fail", "causes": [] if check.passed else [check.name],
            "note": "the trainer's own noise floor: micro-batch size and padding must not move its logprobs",
            "_gaps": None}


def ablate(trainer, names, base, progress, recipe_argv):
    """The gate under each setting in `names` (fault names, or 'async_scheduling'); rows in order."""
    import copy

    from .train import build_trainer

    rows = []
    for name in names:
        progress.set_description(f"probing {name}")
        if name == "async_scheduling":
            s = copy.deepcopy(base)
            s.async_scheduling = True
            try:
                trainer.replace_engine(s)
                run = trainer.full_gate()
                ran = trainer.engine.facts().async_scheduling
                rows.append(_row("async scheduling on", run,
                                 "" if ran else "requested, but this engine runs without it (vLLM turned it off)"))
            except Exception as e:  # an engine that refuses the setting is a finding, not a crash
                rows.append(_blank_row("async scheduling on", "unavailable", f"{type(e).__name__}: {e}"[:200]))
        elif FAULTS[name].trainer_flags:  # the fault lives in how the trainer is built: build a second one
            fault, why_not = FAULTS[name], FAULTS[name].not_applicable(trainer)
            if why_not:
                rows.append(_blank_row(name, "n/a", why_not))
            else:
                other = build_trainer([*recipe_argv, *fault.trainer_flags])
                rows.append(_row(name, run_with_faults(other, [name], other.engine.settings), fault.about))
                other.engine.close()
        elif FAULTS[name].not_applicable(trainer) and not FAULTS[name].run_when_na:
            rows.append(_blank_row(name, "n/a", FAULTS[name].not_applicable(trainer)))
        else:
            why_not = FAULTS[name].not_applicable(trainer)
            rows.append(_row(name, run_with_faults(trainer, [name], base), why_not or FAULTS[name].about))
        progress.update(1)
    return rows


def table(rows) -> str:
    head = ["setting", "mean |Δ|", "p99 |Δ|", "max |Δ|", "k3 KL", "ratio∉[0.8,1.25]", "tokens", "verdict"]
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in rows:
        def f(k):
            return "-" if r.get(k) is None else (f"{r[k]:.3g}" if isinstance(r[k], float) else str(r[k]))
        verdict = r["verdict"] + (f" ({', '.join(r['causes'])})" if r.get("causes") else "")
        lines.append(" | ".join([r["setting"], f("mean_abs_logprob_diff"), f("p99_abs_logprob_diff"),
                                 f("max_abs_logprob_diff"), f("kl_k3"), f("ratio_outside_frac"), f("n_tokens"),
                                 verdict]))
    return "\n".join(lines)


def plot(rows, path: str, thresholds: dict | None = None) -> None:
    """|Δlogp| per setting on a log scale: one horizontal strip of tokens per setting, median marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = [r for r in rows if r.get("_gaps") is not None and len(r["_gaps"])]
    fig, ax = plt.subplots(figsize=(9, 0.55 * len(rows) + 1.6))
    floor = 1e-9
    rng = np.random.default_rng(0)
    for i, r in enumerate(rows):
        g = r["_gaps"].clamp(min=floor).numpy()
        color = "tab:green" if r["verdict"] == "pass" else "tab:red"
        jitter = i + rng.uniform(-0.3, 0.3, size=len(g))
        ax.scatter(g, jitter, s=6, alpha=0.45, color=color, linewidths=0)
        ax.plot([float(r["_gaps"].median().clamp(min=floor))] * 2, [i - 0.3, i + 0.3], color="black", lw=1.5)
    if thresholds:
        ax.axvline(thresholds["max_abs_logprob_diff"], color="tab:red", ls="--", lw=1, label="gate: max |Δ|")
        ax.axvline(thresholds["mean_abs_logprob_diff"], color="tab:orange", ls=":", lw=1, label="gate: mean |Δ|")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_xscale("log")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"{r['setting']}  [{r['verdict']}]" for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel("|trainer logprob − engine logprob| per probe token (log scale; black: median; exact 0 at 1e-9)")
    ax.set_title("trl-correct doctor: mismatch by setting (green: gate passes, red: gate fails)")
    ax.grid(axis="x", which="major", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog="trl-correct doctor", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="recipe YAML (as for train)")
    ap.add_argument("--json", help="write the report as JSON here")
    ap.add_argument("--plot", help="write a PNG of |Δlogp| per setting here")
    ap.add_argument("--inject", action="append", default=[], choices=sorted(FAULTS), metavar="FAULT",
                    help=f"run the gate with this fault present (repeatable; with --calibrate: only these faults, not "
                         f"every one that moves the probe): {', '.join(sorted(FAULTS))}")
    ap.add_argument("--selftest", action="store_true", help="clean run plus every fault (with --inject: only those); "
                                                            "fails unless all are caught")
    ap.add_argument("--calibrate", action="store_true", help="measure the floors, derive the thresholds, show each "
                                                             "fault's margin over them, write a recipe snippet")
    ap.add_argument("--yaml", default="calibration.yaml", help="with --calibrate: where the recipe snippet goes")
    a, recipe_flags = ap.parse_known_args(argv)
    if a.calibrate:
        from .doctor_calibrate import main as calibrate_main

        return calibrate_main(a, recipe_flags)
    subset = a.selftest and bool(a.inject)  # --selftest --inject F ...: the selftest over those faults only
    if any(FAULTS[n].trainer_flags for n in a.inject) and not subset:
        ap.error("--inject: bf16_head_trainer_side changes how the trainer is built; run it with --selftest, or "
                 "pass --fp32_lm_head false yourself")

    import copy

    from tqdm import tqdm

    from .train import build_trainer

    recipe_argv = ["--config", a.config, *recipe_flags]
    trainer = build_trainer(recipe_argv)
    base = copy.deepcopy(trainer.engine.settings)
    listed = [f for f in FAULTS if f in a.inject] if subset else [*FAULTS, "async_scheduling"]
    settings = listed if (a.selftest or not a.inject) else []
    injected_gate = bool(a.inject) and not subset
    with tqdm(total=1 + len(settings) + injected_gate, desc="probing default", file=sys.stderr) as progress:
        clean_run = trainer.full_gate()
        clean = clean_run.report
        rows = [_row("default (trl-correct)", clean_run), _floor_row(clean_run)]
        progress.update(1)
        rows += ablate(trainer, settings, base, progress, recipe_argv)
        report = clean
        if injected_gate:
            progress.set_description(f"probing with {'+'.join(a.inject)}")
            injected = run_with_faults(trainer, a.inject, base)
            report = injected.report
            rows.append(_row("injected: " + "+".join(a.inject), injected))
            progress.update(1)

    out = {"verdict": "pass" if report.passed else "fail", "checks": report.to_dict()["checks"],
           "causes": report.causes, "mismatch": {k: report.mismatch.get(k) for k in MISMATCH_OUT},
           "ablation": [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]}
    print(report.table())
    print()
    print(table(rows))
    ok = report.passed if not injected_gate else all(FAULTS[n].cause in report.causes for n in a.inject)
    if a.selftest:
        by_name = {r["setting"]: r for r in rows}
        out["selftest"] = []
        for name in (n for n in settings if n in FAULTS):  # the faults ablated above, in FAULTS' order
            fault = FAULTS[name]
            r = by_name[name]
            na = fault.not_applicable(trainer)
            detected = None if na else fault.cause in r["causes"]
            out["selftest"].append({"fault": name, "detected": detected, "causes": r["causes"],
                                    "expected": fault.cause, **({"note": na} if na else {})})
        print("\nselftest: fault -> detected -> causes")
        for s in out["selftest"]:
            mark = "n/a" if s["detected"] is None else ("yes" if s["detected"] else "NO")
            print(f"  {s['fault']:<20} {mark:<4} {', '.join(s['causes']) or '-'}  (expected {s['expected']})")
        ok = clean.passed and all(s["detected"] is not False for s in out["selftest"])
        print(f"selftest {'PASSED' if ok else 'FAILED'}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2, default=str)
    if a.plot:
        plot(rows, a.plot, trainer.gate.thresholds)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(guarded("trl-correct doctor", main, sys.argv[1:]))
