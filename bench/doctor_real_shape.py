"""The doctor as a user runs it on a real-shaped model: `trl-correct doctor --selftest` (default: every fault, bf16 on
the CPU, the default child processes for a model over 400 MB), timed, with the peak resident memory of its largest
process, and its selftest matrix (each fault: detected, causes, the fp32 probe's margin where it ran) appended to
docs/BENCHMARKS.md.

    python bench/doctor_real_shape.py [--model qwen2.5-0.5b] [--fp32] [--calibrate] [--no-append] [doctor flags ...]

Peak RSS: getrusage(RUSAGE_CHILDREN).ru_maxrss after the doctor exits, i.e. the largest of the doctor and every child
process it waited for (they run one at a time, so this is the machine's peak for the run, give or take the parent's
few hundred MB). --calibrate runs `doctor --calibrate` instead (each fault's margin over the calibrated thresholds).
"""

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import DOCS, append  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen2.5-0.5b")
    ap.add_argument("--fp32", action="store_true", help="the trainer in fp32 (default: bf16)")
    ap.add_argument("--calibrate", action="store_true")
    ap.add_argument("--no-append", action="store_true")
    a, flags = ap.parse_known_args()
    from models import model_dir

    path = str(model_dir(a.model)) if not os.path.isdir(a.model) else a.model
    work = tempfile.mkdtemp(prefix="doctor-real-")
    out = os.path.join(work, "doctor.json")
    mode = ["--calibrate", "--yaml", os.path.join(work, "calibration.yaml")] if a.calibrate else ["--selftest"]
    cmd = [sys.executable, "-m", "trl_correct.cli", "doctor", "--config", "recipes/tiny.yaml", *mode, "--json", out,
           "--model_name_or_path", path, "--output_dir", os.path.join(work, "run"),
           *([] if a.fp32 else ["--bf16", "true", "--use_cpu", "true"]), *flags]
    shown = " ".join(["trl-correct", *cmd[3:]]).replace(path, f"<{a.model}>").replace(work, "<work>")
    print(f"doctor_real_shape: {shown}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - t0
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # kB -> GB
    with open(os.path.join(work, "stderr.txt"), "w") as f:
        f.write(p.stderr)
    print(p.stdout)
    if not os.path.exists(out):
        sys.exit(f"doctor_real_shape: the doctor wrote no report (exit {p.returncode}); its stderr is in {work}:\n"
                 f"{p.stderr[-3000:]}")
    rep = json.load(open(out))
    processes = re.findall(r"process (\d+)/(\d+) done in (\d+) s", p.stderr)
    na = re.search(r"n/a here, no process started: (.+)", p.stderr)
    lines = [f"It runs `{shown}`.", "",
             f"Exit {p.returncode} in {seconds / 60:.1f} min; peak RSS {peak_gb:.1f} GB (the largest process); "
             f"{len(processes)} processes" + (f", seconds each: {', '.join(s for _, _, s in processes)}"
                                             if processes else "")
             + (f"; n/a, no process started: {na.group(1)}" if na else "") + ".", ""]
    if a.calibrate:
        lines += ["| fault | margin, calibrated | margin, fp32 probe | named | causes |", "|---|---|---|---|---|"]
        for r in rep["faults"]:
            fmt = (lambda x: "-" if x is None else f"{x:.3g}x")
            lines.append(f"| {r['fault']} | {fmt(r['margin_calibrated'])} | {fmt(r['margin_fp32_probe'])} | "
                         f"{'yes' if r['named'] else 'NO'} | {', '.join(r['causes'])} |")
        lines.append(f"\nClean probe {rep['clean_margin']:.3g}x of the calibrated thresholds; verdict "
                     f"{rep['verdict']}.")
    else:
        lines += ["| fault | detected | causes | expected | fp32 probe margin |", "|---|---|---|---|---|"]
        for s in rep["selftest"]:
            mark = "n/a" if s["detected"] is None else ("yes" if s["detected"] else "NO")
            margin = f"{s['margin_fp32_probe']:.3g}x" if "margin_fp32_probe" in s else "-"
            lines.append(f"| {s['fault']} | {mark} | {', '.join(s['causes']) or '-'} | {s['expected']} | {margin} |")
        passed = "PASSED" if "selftest PASSED" in p.stdout else "FAILED"
        lines.append(f"\nClean gate: {rep['verdict']}; selftest {passed}.")
    injected = flags.count("--inject")
    title = f"Doctor {'--calibrate' if a.calibrate else '--selftest'} at real shape: {a.model}, " \
            f"{'fp32' if a.fp32 else 'bf16'}" + (f", {injected} fault{'s' * (injected != 1)} injected"
                                                 if injected else "")
    append(title, "\n".join(lines), append_to=None if a.no_append else DOCS)
    sys.exit(p.returncode)


if __name__ == "__main__":
    main()
