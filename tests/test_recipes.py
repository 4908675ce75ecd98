"""The real-model recipes: every field parses, and each runs through the same loading code on local copies (the
tiny model and a GSM8K-format file standing in for the hub's), with only what a CPU needs overridden."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from trl_correct.tasks.rewards import final_number, final_number_match

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
REAL = sorted(p.name for p in (ROOT / "recipes").glob("*.yaml") if p.name != "tiny.yaml")
CPU = ["--bf16", "false", "--max_steps", "1", "--per_device_train_batch_size", "8", "--num_generations", "4",
       "--max_completion_length", "12", "--gradient_checkpointing", "false", "--report_to", "none",
       "--save_strategy", "no", "--chat_prompts", "false"]  # the tiny tokenizer has no chat template


@pytest.mark.unit
def test_final_number_reward():
    assert final_number("so 3 + 4 = 7 #### 1,234") == 1234.0 and final_number("it is 12, then 15.5") == 15.5
    assert final_number("no digits") is None
    got = final_number_match(["... #### 18", "the answer is 17", [{"role": "assistant", "content": "#### 18"}]],
                             answer=["She pays 2 * 9 = 18\n#### 18"] * 3)
    assert got == [1.0, 0.0, 1.0]


@pytest.mark.parametrize("recipe", REAL)
def test_real_recipe_runs_on_local_copies(recipe, tmp_path, tiny_dir):
    assert recipe.startswith("qwen") and len(REAL) >= 2
    text = (ROOT / "recipes" / recipe).read_text()
    assert text.startswith("# accelerate launch") and "fp32" in text  # launch line first; fp32 head stated
    data = tmp_path / "gsm8k.jsonl"
    data.write_text("".join(json.dumps({"question": f"Tom has {i} apples and buys 3 more. How many now?",
                                        "answer": f"{i} + 3 = {i + 3}\n#### {i + 3}"}) + "\n" for i in range(16)))
    out = tmp_path / "run"
    p = subprocess.run([str(BIN / "trl-correct"), "train", "--config", f"recipes/{recipe}", "--output_dir", str(out),
                        "--model_name_or_path", tiny_dir, "--dataset_name", str(data), *CPU],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    rep = json.loads((out / "correctness_report.json").read_text())
    assert rep["gate"]["verdict"] == "pass" and len(rep["steps"]) == 1 and "reward" in rep["steps"][0]


def test_wrong_prompt_column_is_a_one_line_error(tmp_path, tiny_dir):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"question": "q", "answer": "#### 1"}) + "\n")
    p = subprocess.run([str(BIN / "trl-correct"), "train", "--config", "recipes/tiny.yaml", "--output_dir",
                        str(tmp_path / "o"), "--dataset_name", str(data)], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode != 0
    # a "[rank0]: " prefix appears when the environment names a rank (as the engine's does in this test process)
    lines = [re.sub(r"^\[rank\d+\]: ", "", x) for x in p.stderr.splitlines()]
    assert any(x.startswith("trl-correct train: prompt_column='prompt' is invalid:") for x in lines), \
        p.stderr[-2000:]
    assert "Traceback" not in p.stderr and p.returncode == 2


@pytest.mark.unit
def test_chat_prompts_wrap_the_prompt_column(tmp_path):
    from trl_correct.train import TrainScriptArguments, load_prompts

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"question": "2 + 2?", "answer": "#### 4"}) + "\n")
    rows = load_prompts(TrainScriptArguments(dataset_name=str(data), prompt_column="question", chat_prompts=True,
                                             system_prompt="Be brief."))
    assert rows[0]["prompt"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2?"}]
    assert rows[0]["answer"] == "#### 4"  # the other columns reach the reward functions
