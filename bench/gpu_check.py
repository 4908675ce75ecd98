"""GPU check of the core slice: the main job's code path (trl_correct.train) on the tiny model, on a GPU.

Runs the tiny recipe for a few steps in fp32, bf16 (fp32 head both sides), bf16 with a bf16 head, bf16 with prefix
caching and bf16 with vLLM sleep mode, plus one fault (engine bf16 against an fp32 trainer, gate: observe so the run
goes on), each in its own process, and prints one table of gate verdicts and per-step mismatch. Then the doctor
injects the GPU-only faults (woken from sleep without a reload) and must name their causes. Needs a GPU with vllm + trl installed (see ../shared/gpu/README.md).

    python bench/gpu_check.py --out runs/gpu_check [--model DIR] [--steps 5]
"""

import argparse
import json
import os
import subprocess
import sys
import time

RUNS = [
    ("fp32", ["--bf16", "false"]),
    ("bf16, fp32 head", ["--bf16", "true"]),
    ("bf16, bf16 head", ["--bf16", "true", "--fp32_lm_head", "false"]),
    ("bf16, prefix caching on", ["--bf16", "true", "--enable_prefix_caching", "true"]),
    ("fault: engine bf16 vs trainer fp32", ["--bf16", "false", "--vllm_dtype", "bfloat16", "--gate", "observe"]),
    ("bf16, sleep mode (wake, reload, verify every step)", ["--bf16", "true", "--vllm_enable_sleep_mode", "true"]),
]
# Faults that need a GPU: the doctor injects each and must name its cause (exit 0).
DOCTOR_FAULTS = [("wake_without_reload", ["--bf16", "true", "--vllm_enable_sleep_mode", "true"])]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/gpu_check")
    ap.add_argument("--model", default=None, help="model dir (default: the embedded tiny model)")
    ap.add_argument("--steps", type=int, default=5)
    a = ap.parse_args()
    rows = []
    for name, flags in RUNS:
        out = os.path.join(a.out, name.replace(" ", "_").replace(",", "").replace(":", ""))
        cmd = [sys.executable, "-m", "trl_correct.train", "--config", "recipes/tiny.yaml", "--output_dir", out,
               "--max_steps", str(a.steps), *flags] + (["--model_name_or_path", a.model] if a.model else [])
        t0 = time.time()
        p = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.time() - t0
        path = os.path.join(out, "correctness_report.json")
        if p.returncode or not os.path.exists(path):
            print(f"== {name}: exit {p.returncode}\n{p.stderr[-3000:]}", flush=True)
            rows.append({"run": name, "error": p.stderr[-500:]})
            continue
        rep = json.load(open(path))
        steps = rep["steps"]
        rows.append({"run": name, "gate": rep["gate"]["verdict"], "causes": rep["gate"]["causes"],
                     "probe": rep["gate"]["mismatch"], "engine": rep["engine"], "wall_s": round(wall, 1),
                     "steps": steps})
        g = rep["gate"]
        print(f"== {name}: gate {g['verdict']} {g['causes']} wall {wall:.0f}s", flush=True)
        for c in g["checks"]:
            print(f"   {'ok  ' if c['passed'] else 'FAIL'} {c['name']}: {c['detail']}")
    print("\n| run | gate | causes | probe mean |Δ| | probe max |Δ| | probe k3 KL | step mean |Δ| (max over steps) |"
          " step max |Δ| | TIS on |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['run']} | error | | | | | | | |")
            continue
        p, s = r["probe"], r["steps"]
        print(f"| {r['run']} | {r['gate']} | {','.join(r['causes']) or '-'} | {p['mean_abs_logprob_diff']:.3g} | "
              f"{p['max_abs_logprob_diff']:.3g} | {p['kl_k3']:.3g} | "
              f"{max(x['mean_abs_logprob_diff'] for x in s):.3g} | {max(x['max_abs_logprob_diff'] for x in s):.3g} | "
              f"{sum(x['tis_enabled'] for x in s)}/{len(s)} |")
    for fault, flags in DOCTOR_FAULTS:
        cmd = [sys.executable, "-m", "trl_correct.cli", "doctor", "--config", "recipes/tiny.yaml", "--inject", fault,
               "--output_dir", os.path.join(a.out, "doctor_" + fault), *flags]
        p = subprocess.run(cmd, capture_output=True, text=True)
        named = p.returncode == 0
        print(f"doctor --inject {fault}: {'cause named' if named else 'NOT named (exit %d)' % p.returncode}")
        print(p.stdout[-2500:])
        rows.append({"run": f"doctor --inject {fault}", "named": named, "stdout": p.stdout[-2500:]})
    os.makedirs(a.out, exist_ok=True)
    json.dump(rows, open(os.path.join(a.out, "gpu_check.json"), "w"), indent=2, default=str)


if __name__ == "__main__":
    main()
