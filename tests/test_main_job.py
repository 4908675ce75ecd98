"""The main job as a user runs it: accelerate launch / the trl-correct console script, a YAML recipe, flags that
override it, a local model directory and a local prompt file, and two ranks with one engine each."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run(cmd, out):
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-4000:]
    return json.loads((Path(out) / "correctness_report.json").read_text())


def test_main_job_passes_gate_and_reward_rises(main_job):
    rep = json.loads((main_job / "correctness_report.json").read_text())  # conftest: the README's main job
    steps = rep["steps"]
    assert rep["gate"]["verdict"] == "pass" and len(steps) >= 20
    assert all(s["tis_enabled"] and s["gate_passed"] for s in steps)
    assert max(s["max_abs_logprob_diff"] for s in steps) < 1e-4
    rewards = [s["reward"] for s in steps]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.15, rewards


def test_console_script_flags_local_model_and_local_prompts(tmp_path, tiny_dir):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"The value of item {i} is"}) + "\n" for i in range(16)))
    out = tmp_path / "run"
    rep = run([str(BIN / "trl-correct"), "train", "--config", "recipes/tiny.yaml", "--output_dir", str(out),
               "--max_steps", "2", "--temperature", "0.8", "--model_name_or_path", tiny_dir,
               "--dataset_name", str(prompts)], out)
    assert rep["gate"]["verdict"] == "pass" and len(rep["steps"]) == 2
    assert rep["engine"]["sampler"]["temperature"] == 0.8  # the flag won over the recipe's 0.9


def test_two_ranks_each_with_an_engine(tmp_path):
    out = tmp_path / "run"
    env_flags = ["--max_steps", "2", "--per_device_train_batch_size", "8"]
    rep = run([str(BIN / "accelerate"), "launch", "--config_file", "accelerate_configs/cpu_2proc.yaml", "-m",
               "trl_correct.train", "--config", "recipes/tiny.yaml", "--output_dir", str(out), *env_flags], out)
    assert rep["gate"]["verdict"] == "pass" and len(rep["steps"]) == 2
    # each step's stats are gathered over both ranks: every completion token of 2 ranks x 8 completions
    for s in rep["steps"]:
        assert s["n_tokens"] == round(s["completion_length"] * 16), s
    assert max(s["max_abs_logprob_diff"] for s in rep["steps"]) < 1e-4
