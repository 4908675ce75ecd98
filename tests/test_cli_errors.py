"""Bad input gets one line, not a traceback (issue 29): every error caused by what the user gave to `trl-correct train |
doctor | verify | plot` is one line on stderr naming the field or file, what was found and the fix, exit code 2; from
Python the same errors are typed (trl_correct.errors.UserError, a ValueError) with the same message.

Run in-process (`trl_correct.cli.main(argv)`, capsys): no engine is built (every error here is found before the
trainer is), so every test is `unit` (tests/conftest.py refuses an engine or a subprocess). What "one line" counts:
capsys takes everything Python code writes to sys.stderr in this process, trl-correct's and its dependencies' alike,
and the test requires exactly one line there (so a dependency's progress bar or log line before the error fails it
too). Not counted: Python warnings (pytest's warnings capture takes them; the CLI filters the known ones,
console.py) and what C code writes to the file descriptor (none before an engine exists).
"""

import json
import os
import signal
import time

import pytest

from trl_correct import CorrectGRPOConfig, UserError
from trl_correct.checkpoints import COMPLETE_FILE, OutputDirLock
from trl_correct.cli import main as cli
from trl_correct.errors import ConfigError, DatasetError, ModelError, RecipeError, RewardError

pytestmark = pytest.mark.unit  # builds no engine, starts no subprocess (tests/conftest.py)

TINY = ["--config", "recipes/tiny.yaml"]  # the README's recipe: a valid base for one bad field


@pytest.fixture(autouse=True)
def _fresh_cli_logging():
    """cli_logging() binds a handler to the sys.stderr of the test that first calls it; drop it after each test so
    the next test's capsys sees its own stream."""
    import logging

    from trl_correct.console import CliHandler

    log = logging.getLogger("trl_correct")
    level = log.level
    yield
    for h in [h for h in log.handlers if isinstance(h, CliHandler)]:
        log.removeHandler(h)
    log.setLevel(level)


def one_line(capsys, argv, code=2) -> str:
    """Run the CLI; assert the exit code, exactly one stderr line and no traceback; return the line."""
    assert cli(argv) == code
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def write(path, text: str) -> str:
    path.write_text(text)
    return str(path)


def model_dir(tmp_path, *files) -> str:
    d = tmp_path / "model"
    d.mkdir()
    for f in files:
        (d / f).write_text("{}")
    return str(d)


def partial_checkpoint(out) -> str:
    """A checkpoint folder trl-correct began and never finished: its certificate, no completion marker."""
    ck = out / "checkpoint-4"
    ck.mkdir(parents=True)
    (ck / "correctness_certificate.json").write_text("{}")
    (ck / "model.safetensors").write_text("x")
    return str(ck)


# (argv builder, substring the line must hold: the field or file it names). Each builder gets tmp_path.
BAD_INPUTS = {
    # paths
    "model path missing": (lambda t: [*TINY, "--model_name_or_path", "/nonexistent/model"],
                           "model_name_or_path='/nonexistent/model' is invalid: no such folder"),
    "model folder without config.json": (lambda t: [*TINY, "--model_name_or_path", model_dir(t, "x.txt")],
                                         "has no config.json"),
    "model folder without weights": (lambda t: [*TINY, "--model_name_or_path", model_dir(t, "config.json")],
                                     "has no weights"),
    "model folder without tokenizer": (lambda t: [*TINY, "--model_name_or_path",
                                                  model_dir(t, "config.json", "model.safetensors")], "no tokenizer"),
    "model file, not folder": (lambda t: [*TINY, "--model_name_or_path", write(t / "m.bin", "x")], "is a file"),
    "recipe missing": (lambda t: ["--config", str(t / "nope.yaml")], "nope.yaml does not exist"),
    "dataset file missing": (lambda t: [*TINY, "--dataset_name", str(t / "prompts.jsonl")],
                             "dataset_name="),
    # recipe syntax
    "recipe YAML syntax": (lambda t: ["--config", write(t / "r.yaml", "bf16: false\ntis_cap: [2\ngate: warn\n")],
                           "r.yaml:3:5: YAML syntax error"),
    "recipe YAML syntax (--config=)": (lambda t: [f"--config={write(t / 'r.yaml', 'a: b: c')}"], "r.yaml:1:5:"),
    "recipe not a mapping": (lambda t: ["--config", write(t / "r.yaml", "- bf16\n- false\n")],
                             "a recipe is a YAML mapping"),
    # unknown fields
    "recipe unknown field": (lambda t: ["--config", write(t / "r.yaml", "bf16: false\ntis_capp: 3\n")],
                             "unknown field tis_capp (did you mean tis_cap?)"),
    "flag unknown field": (lambda t: [*TINY, "--tis_capp", "3"], "unknown field tis_capp (did you mean tis_cap?)"),
    "flag unknown field, dashes": (lambda t: [*TINY, "--learning-rat", "3"],
                                   "unknown field learning-rat (did you mean learning_rate?)"),
    # choices and types
    "invalid choice": (lambda t: [*TINY, "--gate", "enforced"],
                       "--gate enforced is invalid: choose from enforce, warn, observe (did you mean enforce?)"),
    "flag not a number": (lambda t: [*TINY, "--tis_cap", "abc"], "--tis_cap abc is invalid: it must be a number"),
    "flag not an integer": (lambda t: [*TINY, "--max_steps", "2.5"], "--max_steps 2.5 is invalid"),
    "flag not a bool": (lambda t: [*TINY, "--fp32_lm_head", "maybe"], "--fp32_lm_head is invalid"),
    "recipe value a list": (lambda t: ["--config", write(t / "r.yaml", "bf16: false\ntis_cap: [2]\n")],
                            "tis_cap=[2] in"),
    "recipe value not an integer": (lambda t: ["--config", write(t / "r.yaml", "bf16: false\nprobe_size: 2.5\n")],
                                    "probe_size=2.5 in"),
    "recipe value not text": (lambda t: ["--config", write(t / "r.yaml", "bf16: false\nvllm_dtype: 16\n")],
                              "vllm_dtype=16 in"),
    # ranges and combinations (config.py)
    "range: tis_cap": (lambda t: [*TINY, "--tis_cap", "0.5"], "tis_cap=0.5 is invalid: the cap must be > 1"),
    "range: top_p": (lambda t: [*TINY, "--top_p", "0"], "top_p=0.0 is invalid"),
    "range: threshold": (lambda t: [*TINY, "--max_kl_k3", "0"], "max_kl_k3=0.0 is invalid"),
    "combination: raw logprobs at T != 1": (lambda t: [*TINY, "--logprobs_mode", "raw_logprobs"],
                                            "logprobs_mode='raw_logprobs' is invalid"),
    "combination: head flags": (lambda t: [*TINY, "--fp32_lm_head", "false", "--cast_lm_head_to_fp32", "true"],
                                "cast_lm_head_to_fp32=True is invalid"),
    "combination: vllm_mode": (lambda t: [*TINY, "--vllm_mode", "server"], "vllm_mode='server' is invalid"),
    "TRL's check: batch vs generations": (lambda t: [*TINY, "--per_device_train_batch_size", "3"],
                                          "per_device_train_batch_size is invalid"),
    # datasets
    "dataset without the prompt column": (lambda t: [*TINY, "--dataset_name", write(t / "d.jsonl",
                                                                                      '{"question": "2+2?"}\n')],
                                          "prompt_column='prompt' is invalid: "),
    "dataset with no rows": (lambda t: [*TINY, "--dataset_name", write(t / "d.json", "[]")], "dataset_name="),
    "dataset empty file": (lambda t: [*TINY, "--dataset_name", write(t / "d.jsonl", "")], "the file is empty"),
    "dataset non-string prompt": (lambda t: [*TINY, "--dataset_name", write(t / "d.jsonl",
                                                                            '{"prompt": "a"}\n{"prompt": 7}\n')],
                                  "row 1: the prompt is int"),
    "dataset blank prompt": (lambda t: [*TINY, "--dataset_name", write(t / "d.jsonl", '{"prompt": "  "}\n')],
                             "row 0: the prompt is empty"),
    "dataset not JSON": (lambda t: [*TINY, "--dataset_name", write(t / "d.jsonl", '{"prompt": "a"\n')],
                         "not readable as jsonl"),
    "dataset unknown format": (lambda t: [*TINY, "--dataset_name", write(t / "d.txt", "hello")], "a .txt file"),
    # rewards
    "reward not importable": (lambda t: [*TINY, "--reward_funcs", "no_such_module.reward"],
                              "reward_funcs: cannot import 'no_such_module.reward'"),
    "reward not a dotted path": (lambda t: [*TINY, "--reward_funcs", "reward"], "reward_funcs: 'reward' is not"),
    "reward not callable": (lambda t: [*TINY, "--reward_funcs", "os.sep"], "reward_funcs: os.sep is a str"),
    # checkpoints and output_dir
    "resume path missing": (lambda t: [*TINY, "--output_dir", str(t / "out"), "--resume_from_checkpoint",
                                       str(t / "out" / "checkpoint-9")], "resume_from_checkpoint="),
    "resume path partial": (lambda t: [*TINY, "--output_dir", str(t / "out"), "--resume_from_checkpoint",
                                       partial_checkpoint(t / "out")], "a partial checkpoint (no " + COMPLETE_FILE),
    "resume latest, none whole": (lambda t: [*TINY, "--output_dir", str(t / "out"), "--resume_from_checkpoint", "true",
                                             *([] if partial_checkpoint(t / "out") else [])],
                                  "no whole checkpoint in"),
    "output_dir holds a run": (lambda t: [*TINY, "--output_dir", str(t / "out"), "--overwrite_output_dir", "false",
                                          *([] if partial_checkpoint(t / "out") else [])],
                               "it holds a previous run (checkpoint-4)"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2(case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # recipes/ is relative
    build, expect = BAD_INPUTS[case]
    argv = build(tmp_path)
    if "--output_dir" not in argv:
        argv += ["--output_dir", str(tmp_path / "run")]
    line = one_line(capsys, ["train", *argv])
    assert line.startswith("trl-correct train: ") and expect in line, line


def test_hub_name_offline_is_one_line(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    line = one_line(capsys, ["train", *TINY, "--output_dir", str(tmp_path), "--model_name_or_path",
                             "nobody-here/no-such-model"])
    assert "model_name_or_path='nobody-here/no-such-model' is invalid" in line and "HF_HUB_OFFLINE" in line


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="bf16 is valid on a GPU")
def test_bf16_without_gpu_names_the_field(capsys, tmp_path):
    line = one_line(capsys, ["train", "--output_dir", str(tmp_path), "--bf16", "true"])
    assert "bf16=True is invalid" in line and "bf16: false" in line


def test_output_dir_held_by_a_live_run_then_taken_over_after_kill(capsys, tmp_path, caplog):
    """A second run on an output_dir a live process holds: one line naming it and the holder's pid. After that
    process is killed (-9), its lock file is left behind; the next run takes it over with a note."""
    out = tmp_path / "out"
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the other run: hold the lock until killed
        try:
            os.close(r)
            OutputDirLock(str(out)).acquire()
            os.write(w, b"1")
            time.sleep(600)
        finally:
            os._exit(0)
    os.close(w)
    try:
        assert os.read(r, 1) == b"1"
        line = one_line(capsys, ["train", "--config", "recipes/tiny.yaml", "--output_dir", str(out)])
        assert f"output_dir {out} is in use by another run (pid {pid} " in line
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(r)
    assert json.loads((out / ".trl-correct.lock").read_text())["pid"] == pid  # left behind by the killed run
    with caplog.at_level("WARNING", logger="trl_correct"), OutputDirLock(str(out)):
        assert json.loads((out / ".trl-correct.lock").read_text())["pid"] == os.getpid()
    assert f"took over the lock left by pid {pid}" in caplog.text
    assert not (out / ".trl-correct.lock").exists()  # released


@pytest.mark.parametrize("argv,expect", [
    (["trian"], "unknown command 'trian' (did you mean train?)"),
    (["doctor"], "--config is required"),
    (["doctor", "--config", "recipes/tiny.yaml", "--inject", "temperature_mising"],
     "(did you mean temperature_missing?)"),
    (["doctor", "--config", "missing.yaml"], "missing.yaml does not exist"),
    (["plot", "."], "correctness_report.json not found"),
    (["verify", "recipes"], "no correctness_certificate.json"),
    (["verify", "recipes", "--bogus"], "unknown field bogus"),
])
def test_other_commands_one_line(argv, expect, capsys, monkeypatch):
    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert expect in one_line(capsys, argv)


def test_plot_unreadable_report(tmp_path, capsys):
    (tmp_path / "correctness_report.json").write_text("{not json")
    assert "is not readable as JSON" in one_line(capsys, ["plot", str(tmp_path)])


def test_verify_partial_checkpoint_refused(tmp_path, capsys):
    ck = partial_checkpoint(tmp_path)
    assert "is a partial checkpoint" in one_line(capsys, ["verify", ck])


# -- the traceback on request, the typed errors from Python ---------------------------------------------------------

def test_debug_flag_and_env_give_the_traceback(capsys, monkeypatch):
    with pytest.raises(ConfigError) as e:
        cli(["train", "--config", "recipes/tiny.yaml", "--gate", "enforced", "--debug"])
    assert "--gate enforced" in str(e.value)
    monkeypatch.setenv("TRL_CORRECT_DEBUG", "1")
    with pytest.raises(RecipeError):
        cli(["train", "--tis_capp", "3"])
    monkeypatch.delenv("TRL_CORRECT_DEBUG")
    assert cli(["train", "--tis_capp", "3"]) == 2  # and without them, one line again


def test_module_entry_exits_2(capsys):
    from trl_correct.train import main

    with pytest.raises(SystemExit) as e:
        main(["--tis_capp", "3"])
    assert e.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1


def test_python_raises_typed_errors_with_the_same_message(tmp_path, monkeypatch):
    from trl_correct.cli.train import TrainScriptArguments, load_prompts, load_reward, parse

    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with pytest.raises(ConfigError, match=r"^tis_cap=0.5 is invalid"):
        CorrectGRPOConfig(output_dir=str(tmp_path), bf16=False, tis_cap=0.5)
    with pytest.raises(ConfigError, match=r"^tis_cap=\[2\] is invalid: it is a list, not a number$"):
        CorrectGRPOConfig(output_dir=str(tmp_path), bf16=False, tis_cap=[2])
    with pytest.raises(RecipeError, match="did you mean tis_cap"):
        parse(["--config", "recipes/tiny.yaml", "--tis_capp", "3"])
    with pytest.raises(RewardError):
        load_reward("nope.nope")
    data = tmp_path / "d.jsonl"
    data.write_text('{"q": "x"}\n')
    with pytest.raises(DatasetError, match="prompt_column"):
        load_prompts(TrainScriptArguments(dataset_name=str(data)))
    from trl_correct.cli.train import check_model

    with pytest.raises(ModelError):
        check_model("/nonexistent/model")
    assert issubclass(UserError, ValueError)  # code that caught the old ValueErrors keeps working


# -- rewards at run time ------------------------------------------------------------------------------------------

def _raises(completions, **kw):
    return [1.0 / 0 for _ in completions]


def _nan(completions, **kw):
    return [0.0, float("nan")][: len(completions)]


def _short(completions, **kw):
    return [0.0]


def _ok(completions, **kw):
    return [None, 1.0]


@pytest.mark.parametrize("fn,expect", [
    (_raises, "tests.x raised ZeroDivisionError: float division by zero"),
    (_nan, "tests.x returned nan for completion 1 (of 2)"),
    (_short, "tests.x returned 1 rewards for 2 completions"),
])
def test_reward_that_raises_or_returns_nan_is_named(fn, expect):
    from trl_correct.cli.train import checked_reward

    with pytest.raises(RewardError) as e:
        checked_reward(fn, "tests.x")(prompts=["a", "b"], completions=["c", "d"])
    assert expect in str(e.value) and "\n" not in str(e.value)


def test_checked_reward_keeps_name_and_none():
    from trl_correct.cli.train import checked_reward

    f = checked_reward(_ok, "tests.ok")
    assert f.__name__ == "_ok" and f(prompts=["a", "b"], completions=["c", "d"]) == [None, 1.0]


def test_plot_unknown_option_suggests(tmp_path, capsys):
    assert "unknown option --outt (did you mean out?)" in one_line(capsys, ["plot", str(tmp_path), "--outt", "x"])


def test_gate_failure_keeps_exit_1_and_its_report(capsys):
    """A gate failure is not a user error: exit 1 (an uncaught GateFailure's code before), its report on stderr."""
    from trl_correct.cli import guarded
    from trl_correct.core.checks import Check, GateFailure, GateReport

    def fails(argv):
        raise GateFailure(GateReport((Check("dtype", False, "trainer float32, engine bfloat16", "set vllm_dtype"),),
                                     {}))

    assert guarded("trl-correct train", fails, []) == 1
    err = capsys.readouterr().err
    assert err.startswith("trl-correct train: trl-correct gate failed before training (causes: dtype)")
    assert "Traceback" not in err
