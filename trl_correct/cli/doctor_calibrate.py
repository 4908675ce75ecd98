"""`trl-correct doctor --calibrate`: the gate's calibration on this model and machine, and what it buys.

    trl-correct doctor --config RECIPE --calibrate [--yaml OUT.yaml] [--json OUT.json] [--inject FAULT ...] [flags]

1. Builds the recipe's trainer and engine and runs the gate once, clean: the floors it calibrates from (the trainer
   against itself across batch shapes and, in bf16/fp16 with fp32 weights, against fp32) and the thresholds derived
   by calibrate.py's rule.
2. Measures one more floor the gate itself does not use: the engine against itself (each probe prompt sampled alone
   vs in the batch). Where it is above the trainer's, the thresholds are derived again with it included.
3. Injects each fault of faults.py that moves the probe (as --selftest does; only the `--inject` ones if given) and
   prints its figures, the margin over the calibrated thresholds (the largest of fault/threshold over mean, p99
   and k3: > 1 means the generic mismatch check alone catches it) next to the same margin over the fixed per-dtype
   values, and whether the fault's own check named it.
4. Writes a recipe snippet (YAML) pinning the derived thresholds, with the floors and the rule as comments.

With --per-process N (default: 1 for a model over 400 MB of weights, as the selftest) the faults run in child
processes of at most N engines each, the first of which also runs steps 1-2 (vLLM does not give back an engine's
memory in the process that built it); the tables are merged.

Exit code: 0 when the clean gate passes and every applicable fault is named by its own cause, 1 otherwise.
"""

import copy
import json
import sys
from datetime import date

from ..core.calibrate import CALIBRATED, CAP_ONLY, calibrate
from ..config import THRESHOLD_FIELDS
from ..testing.faults import FAULTS, calibration_faults, run_with_faults
from ..core.checks import SHORT


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3g}"


def _margin(stats: dict, thresholds: dict) -> float:
    """How far past its threshold the fault's most telling statistic lies (> 1: the mismatch check fails)."""
    return max(stats[k] / thresholds[k] if thresholds[k] > 0 else float("inf") for k in CALIBRATED)


def _precise_margin(mismatch: dict) -> float | None:
    """The same margin on the fp32 probe (bf16/fp16 with precise_probe), against its own thresholds; None when it
    did not run."""
    p = (mismatch or {}).get("fp32_probe") or {}
    return _margin(p, p["thresholds"]) if "thresholds" in p else None


def main(a, recipe_flags: list[str]) -> int:
    from .doctor import default_per_process, engine_groups, in_children

    recipe_argv = ["--config", a.config, *recipe_flags]
    if a.only is not None:  # a child process of the one below: measure its share, report as JSON
        data = measure(recipe_argv, a.only, clean=not a.no_clean, na_check=a.na_check)
        with open(a.json, "w") as f:
            json.dump(data, f, default=str)
        return 0
    names = [n for n in calibration_faults() if not a.inject or n in a.inject]
    per_process = a.per_process if a.per_process is not None else default_per_process(recipe_argv)
    if per_process <= 0:
        return render(a, measure(recipe_argv, names, clean=True))
    children = in_children([*recipe_argv, "--calibrate"], engine_groups(names, per_process), " --calibrate")
    if isinstance(children, int):
        return children
    data = children[0]
    data["rows"] = sorted((r for c in children for r in c["rows"]), key=lambda r: names.index(r["fault"]))
    return render(a, data)


def measure(recipe_argv: list[str], names: list[str], clean: bool = True, na_check=()) -> dict:
    """Build the recipe's trainer; with `clean`, gate it clean and derive the floors and thresholds (the text of
    their tables under "head"); then inject each applicable fault of `names` in turn. JSON-able: a child process
    writes it, the parent renders it; "na": those of `na_check` not applicable here (doctor.in_children)."""
    from .doctor import build_for, skipped

    trainer = build_for(recipe_argv, None if clean or not names else names[0])
    base = copy.deepcopy(trainer.clean_settings)
    data: dict = {"rows": [], "na": skipped(trainer, na_check, calibrating=True)}
    if clean:
        print("trl-correct doctor --calibrate: clean gate ...", file=sys.stderr, flush=True)
        run = trainer.full_gate()
        floors = run.floors.to_dict()
        if run.probe is not None:
            floors["engine_vs_itself"] = trainer.gate.engine_floor(run.probe)
        a_dtype, on_gpu = trainer.compute_dtype, trainer.on_gpu
        pinned = calibrate(floors if trainer.args.calibrate else {}, a_dtype, on_gpu,
                           user=trainer.args.user_thresholds(), bit_exact=trainer.args.bit_exact)
        fixed = calibrate({}, a_dtype, on_gpu).values()
        runtime = trainer.gate.calibration.values()
        head = [run.report.table(), "",
                "floors (what a healthy implementation differs by on this model and machine):",
                "| floor | mean |Δ| | p99 |Δ| | max |Δ| | k3 KL | tokens |", "|---|---|---|---|---|---|"]
        for name, f in floors.items():
            if isinstance(f, dict):
                head.append(f"| {name} | {_fmt(f['mean_abs_logprob_diff'])} | {_fmt(f['p99_abs_logprob_diff'])} | "
                            f"{_fmt(f['max_abs_logprob_diff'])} | {_fmt(f['kl_k3'])} | {f['n_tokens']} |")
            else:
                head.append(f"| {name} | not measured: {f} | | | | |")
        head += ["", "thresholds (rule: calibrate.py; the engine floor is included here, the gate itself uses the "
                     "trainer's):", "| statistic | derived | source | rule | gate's own | fixed |",
                 "|---|---|---|---|---|---|"]
        for k, t in pinned.thresholds.items():
            head.append(f"| {SHORT[k]} | {_fmt(t.value)} | {t.source} | {t.rule} | {_fmt(runtime[k])} | "
                        f"{_fmt(fixed[k])} |")
        data.update(head="\n".join(head), clean=run.report.to_dict(), clean_passed=run.report.passed,
                    clean_mismatch=run.report.mismatch, floors=floors, calibration=pinned.to_dict(),
                    cal=pinned.values(), fixed=fixed, snippet=yaml_snippet(pinned, floors, trainer))
    for name in names:
        fault = FAULTS[name]
        if fault.not_applicable(trainer):
            continue
        print(f"trl-correct doctor --calibrate: injecting {name} ...", file=sys.stderr, flush=True)
        m = run_with_faults(trainer, [name], base).report
        data["rows"].append({"fault": name, "named": fault.named_by(m.causes), "causes": m.causes,
                             "mismatch": m.mismatch})
    # no engine rebuilt with `base` here: the process ends with this command, and each rebuild costs an engine's start
    return data


def render(a, data: dict) -> int:
    """Print the tables of measure()'s `data`, write the recipe snippet (and --json); the exit code."""
    cal, fixed = data["cal"], data["fixed"]
    print(data["head"])
    rows, ok = [], data["clean_passed"]
    for r in data["rows"]:
        m = r["mismatch"]
        ok &= r["named"]
        rows.append({"fault": r["fault"], **{k: (m or {}).get(k) for k in (*CALIBRATED, CAP_ONLY)},
                     "named": r["named"], "causes": r["causes"], "margin_calibrated": _margin(m, cal) if m else None,
                     "margin_fixed": _margin(m, fixed) if m else None, "margin_fp32_probe": _precise_margin(m)})

    print("\nfaults that move the probe: margin = largest fault/threshold over mean, p99, k3 (> 1: the generic "
          "mismatch check alone catches it)")
    precise = any(r["margin_fp32_probe"] is not None for r in rows)
    print("| fault | mean |Δ| | p99 |Δ| | k3 KL | margin, calibrated | margin, fixed | "
          + ("margin, fp32 probe | " if precise else "") + "named by its own check |")
    print("|---|---|---|---|---|---|---|" + ("---|" if precise else ""))
    for r in rows:
        print(f"| {r['fault']} | {_fmt(r['mean_abs_logprob_diff'])} | {_fmt(r['p99_abs_logprob_diff'])} | "
              f"{_fmt(r['kl_k3'])} | {_fmt(r['margin_calibrated'])}x | {_fmt(r['margin_fixed'])}x | "
              + (f"{_fmt(r['margin_fp32_probe'])}x | " if precise else "")
              + f"{'yes' if r['named'] else 'NO'} ({', '.join(r['causes'])}) |")
    clean_m = data["clean_mismatch"]
    clean_margin = _margin(clean_m, cal) if clean_m else None
    print(f"\nclean probe: {_fmt(clean_margin)}x of the calibrated thresholds (must stay below 1)")
    clean_precise = _precise_margin(clean_m)
    if clean_precise is not None or (clean_m or {}).get("fp32_probe"):
        why = "" if clean_precise is not None else f"; not run: {clean_m['fp32_probe'].get('not_run')}"
        print(f"clean fp32 probe: {_fmt(clean_precise)}x of its thresholds (must stay below 1){why}")

    with open(a.yaml, "w") as f:
        f.write(data["snippet"])
    print(f"\nrecipe snippet written to {a.yaml}:\n{data['snippet']}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"verdict": "pass" if ok else "fail", "clean": data["clean"], "floors": data["floors"],
                       "clean_margin": clean_margin, "clean_margin_fp32_probe": clean_precise,
                       "calibration": data["calibration"], "fixed": fixed, "faults": rows}, f, indent=2, default=str)
    return 0 if ok else 1


def yaml_snippet(calibration, floors: dict, trainer) -> str:
    """Recipe lines pinning the thresholds, with where they came from as comments."""
    model = trainer.accelerator.unwrap_model(trainer.model).name_or_path
    lines = [f"# trl-correct doctor --calibrate, {date.today().isoformat()}: {model}, {trainer.compute_dtype}, "
             f"{'GPU' if trainer.on_gpu else 'CPU'}",
             "# floors: " + "; ".join(f"{n} mean {f['mean_abs_logprob_diff']:.3g} p99 {f['p99_abs_logprob_diff']:.3g} "
                                      f"k3 {f['kl_k3']:.3g}" for n, f in floors.items() if isinstance(f, dict)),
             "# rule: threshold = min(cap, max(factor x largest floor, minimum)), factor 4 (k3: 16; over the fp32 "
             "precision floor 8, k3: 64); max |Δ|: cap only"]
    for k, t in calibration.thresholds.items():
        lines.append(f"{THRESHOLD_FIELDS[k]}: {t.value:.4g}  # {t.source}: {t.rule}")
    return "\n".join(lines) + "\n"
