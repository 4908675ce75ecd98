"""`trl-correct plot RUN_DIR`: a run's reward and trainer/engine mismatch per step, as one PNG.

    trl-correct plot runs/tiny [--out runs/tiny/correctness.png]

Reads RUN_DIR/correctness_report.json (written by every run, also when `enforce` stops one). Three panels sharing the
step axis: reward (and mean completion length); mean / p99 / max |Δlogp| on a log scale with the gate's thresholds;
the importance ratios before truncation (share of tokens and sequences outside [0.8, 1.25]) and the share of tokens
truncated or masked. Steps trained without the correction are shaded; gate failures and resumes are marked.
"""

import argparse
import json
import os
import sys

from . import ArgumentParser, guarded

FLOOR = 1e-9  # an exact 0 on a log axis


def plot_run(report: dict, path: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    steps = report.get("steps") or []
    if not steps:
        raise ValueError("the report has no training steps to plot (did the run stop before step 0?)")
    x = [s["step"] for s in steps]
    fig, (ax_r, ax_d, ax_w) = plt.subplots(3, 1, figsize=(9, 8.5), sharex=True,
                                           gridspec_kw={"height_ratios": [1.1, 1.3, 1]})
    if any("reward" in s for s in steps):
        ax_r.plot(x, [s.get("reward") for s in steps], color="tab:green", marker=".", label="reward")
    ax_r.set_ylabel("reward")
    if any("completion_length" in s for s in steps):
        ax_len = ax_r.twinx()
        ax_len.plot(x, [s.get("completion_length") for s in steps], color="tab:gray", lw=1, ls=":",
                    label="completion length")
        ax_len.set_ylabel("mean completion length", color="tab:gray")
    ax_r.legend(loc="upper left", fontsize=8)

    for key, color, label in (("mean_abs_logprob_diff", "tab:blue", "mean |Δ|"),
                              ("p99_abs_logprob_diff", "tab:purple", "p99 |Δ|"),
                              ("max_abs_logprob_diff", "tab:red", "max |Δ|")):
        ax_d.plot(x, [max(s[key], FLOOR) for s in steps], color=color, marker=".", label=label)
    th = report.get("thresholds") or {}
    for key, color in (("mean_abs_logprob_diff", "tab:blue"), ("max_abs_logprob_diff", "tab:red")):
        if key in th:
            ax_d.axhline(th[key], color=color, ls="--", lw=1, alpha=0.6)
    ax_d.set_yscale("log")
    ax_d.set_ylabel("|trainer − engine logprob|\n(dashed: gate thresholds)")
    ax_d.legend(loc="upper left", fontsize=8, ncol=3)

    for key, color, label in (("tokens_outside_0.8_1.25", "tab:orange", "tokens: ratio ∉ [0.8, 1.25]"),
                              ("seqs_outside_0.8_1.25", "tab:brown", "sequences: ratio ∉ [0.8, 1.25]"),
                              ("clip_frac", "black", "tokens truncated / masked")):
        if any(key in s for s in steps):
            ax_w.plot(x, [s.get(key, 0.0) for s in steps], color=color, marker=".", label=label)
    ax_w.set_ylim(-0.03, 1.03)
    ax_w.set_ylabel("share (ratios before truncation)")
    ax_w.set_xlabel("optimizer step")
    ax_w.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax_w.legend(loc="upper left", fontsize=8)

    for ax in (ax_r, ax_d, ax_w):
        for s in steps:
            if not s.get("tis_enabled"):
                ax.axvspan(s["step"] - 0.5, s["step"] + 0.5, color="tab:red", alpha=0.08, lw=0)
        for f in report.get("failures") or []:
            ax.axvline(f["step"], color="tab:red", lw=1)
        for r in report.get("resumes") or []:
            if r.get("step") is not None:
                ax.axvline(r["step"] - 0.5, color="tab:blue", lw=1, ls="-.")
        ax.grid(alpha=0.3)
    causes = sorted({c for f in report.get("failures") or [] for c in f.get("causes", [])})
    gate = (report.get("gate") or {}).get("verdict", "?")
    sub = f"gate before step 0: {gate}" + (f"; failures: {', '.join(causes)} (red lines)" if causes else "")
    sub += "; red shade: no correction" if any(not s.get("tis_enabled") for s in steps) else ""
    sub += "; dash-dot: resumed" if report.get("resumes") else ""
    ax_r.set_title((title + "\n" if title else "") + sub, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog="trl-correct plot", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", help="a run's output_dir (holds correctness_report.json)")
    ap.add_argument("--out", help="PNG path (default: RUN_DIR/correctness.png)")
    a = ap.parse_args(argv)
    path = os.path.join(a.run_dir, "correctness_report.json")
    if not os.path.exists(path):
        print(f"trl-correct plot: {path} not found: give the output_dir of a trl-correct run", file=sys.stderr)
        return 2
    try:
        with open(path) as f:
            report = json.load(f)
    except (OSError, ValueError) as e:
        print(f"trl-correct plot: {path} is not readable as JSON ({type(e).__name__}: {e}); give the output_dir of a "
              "trl-correct run", file=sys.stderr)
        return 2
    if not isinstance(report, dict):
        print(f"trl-correct plot: {path} is not a trl-correct report (a JSON {type(report).__name__}); give the "
              "output_dir of a trl-correct run", file=sys.stderr)
        return 2
    out = a.out or os.path.join(a.run_dir, "correctness.png")
    try:
        plot_run(report, out, title=os.path.basename(os.path.normpath(a.run_dir)))
    except ValueError as e:
        print(f"trl-correct plot: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(guarded("trl-correct plot", main, sys.argv[1:]))
