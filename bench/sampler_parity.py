"""Engine vs trainer logprobs per sampler setting, with trl-correct's processed head and with TRL's temperature-only
head, on the real vLLM engine and the tiny model.

    python bench/sampler_parity.py [--config recipes/tiny.yaml] [--probe_size 8] [--probe_tokens 32]

For each setting: build the recipe's trainer with it, run the gate (the engine samples with the transform, the
trainer scores the same token ids), then score the same probe again after removing the processed head (what stock
TRL 1.16 computes). Prints one markdown table; append it to docs/BENCHMARKS.md with the command and versions.
"""

import argparse
import os
import tempfile

from trl_correct.core.checks import mismatch_check
from trl_correct.adapters.head import remove_processed_head
from trl_correct.train import build_trainer

SETTINGS = {
    "top_k=5": ["--top_k", "5"],
    "top_p=0.7": ["--top_p", "0.7"],
    "min_p=0.2": ["--min_p", "0.2"],
    "repetition_penalty=1.5": ["--repetition_penalty", "1.5"],
    "presence_penalty=1.0": ["--presence_penalty", "1.0"],
    "frequency_penalty=0.8": ["--frequency_penalty", "0.8"],
    "all six": ["--top_k", "20", "--top_p", "0.9", "--min_p", "0.05", "--repetition_penalty", "1.2",
                "--presence_penalty", "0.3", "--frequency_penalty", "0.2"],
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="recipes/tiny.yaml")
    ap.add_argument("--probe_size", default="8")
    ap.add_argument("--probe_tokens", default="32")
    a = ap.parse_args()
    out = tempfile.mkdtemp(prefix="sampler-parity-")
    rows = []
    for name, flags in SETTINGS.items():
        t = build_trainer(["--config", a.config, "--output_dir", os.path.join(out, name), "--probe_size",
                           a.probe_size, "--probe_tokens", a.probe_tokens, *flags])
        report = t.run_gate()
        remove_processed_head(t.accelerator.unwrap_model(t.model))
        off = t.probe().stats
        off_causes = [] if mismatch_check(off, t.thresholds).passed else ["mismatch"]
        off_causes += ["sampler_support"] if off["n_outside_support"] else []
        rows.append((name, report, off, off_causes))
        t.engine.close()
    print("| setting | tokens | with transform: mean \\|Δ\\| | max \\|Δ\\| | k3 KL | gate | temperature only (stock TRL): "
          "mean \\|Δ\\| | max \\|Δ\\| | k3 KL | would fail on |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, rep, off, causes in rows:
        m = rep.mismatch
        print(f"| {name} | {m['n_tokens']} | {m['mean_abs_logprob_diff']:.2e} | {m['max_abs_logprob_diff']:.2e} | "
              f"{m['kl_k3']:.1e} | {'pass' if rep.passed else 'FAIL ' + ','.join(rep.causes)} | "
              f"{off['mean_abs_logprob_diff']:.3g} | {off['max_abs_logprob_diff']:.3g} | {off['kl_k3']:.2g} | "
              f"{', '.join(causes) or '-'} |")


if __name__ == "__main__":
    main()
