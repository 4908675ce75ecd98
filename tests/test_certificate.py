"""The parity certificate travels with the model, and `trl-correct verify` re-checks it, on the real engine.

The main job (conftest `main_job`: the README's command, 30 steps, checkpoints every 10) is shared by the tests that
read its output: the certificate is in the final model folder and in every checkpoint, validates against the packaged
schema, and its weight fingerprint is that of the safetensors on disk; `trl-correct verify` holds on it (exit 0),
names the weight group after one element of a saved weight is moved by one ulp (exit 1), and finds no certificate in a
plain model folder (exit 2). A fault injected mid-run under `gate: warn` is on the certificate (step and cause) and
the model card says steps ran uncorrected. Under LoRA the certificate covers base + adapter deltas, and verify loads
both.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file

from conftest import MAIN_JOB_SAVE_EVERY
from trl_correct import certificate
from trl_correct.cli import main as cli
from trl_correct.testing.faults import inject

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STEPS, SAVE_EVERY = 30, MAIN_JOB_SAVE_EVERY
VICTIM = "model.layers.0.mlp.down_proj.weight"  # the saved weight one test moves by one ulp


def verify_rows(out: str) -> dict:
    """verify's table, {check: [certificate, here, holds]}."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("check ") and "| certificate" in line)
    rows = {}
    for line in lines[start + 2:]:
        cells = [c.strip() for c in line.split(" | ")]
        if len(cells) != 4:
            break
        rows[cells[0]] = cells[1:]
    return rows


def schema_errors(cert: dict) -> list[str]:
    return [e.message for e in jsonschema.Draft202012Validator(certificate.schema()).iter_errors(cert)]


def test_main_job_certifies_the_final_model_and_every_checkpoint(main_job):
    folders = [main_job, *(main_job / f"checkpoint-{s}" for s in range(SAVE_EVERY, STEPS + 1, SAVE_EVERY))]
    certs = [certificate.load(str(f)) for f in folders]
    for folder, cert in zip(folders, certs):
        assert cert is not None, f"no certificate in {folder}"
        assert schema_errors(cert) == [], folder
        assert cert["verdict"] == "pass" and cert["gate"]["verdict"] == "pass" and not cert["run"]["failures"]
        on_disk, _ = certificate.weights_fingerprint(load_file(str(folder / "model.safetensors")).items())
        assert cert["weights"]["fingerprint"] == on_disk, folder  # bound to the weights saved beside it
        card = (folder / "README.md").read_text()
        assert "## Training correctness" in card and "**Verdict: PASS**" in card
        assert "[correctness_certificate.json](correctness_certificate.json)" in card
        assert "trained using [TRL]" in card and "- trl-correct" in card  # TRL's own card is kept, tagged
    final, first = certs[0], certs[1]
    assert final["model"]["global_step"] == STEPS and first["model"]["global_step"] == SAVE_EVERY
    assert final["run"]["steps"] == STEPS and final["run"]["steps_tis_on"] == STEPS
    assert first["run"]["steps"] == SAVE_EVERY
    assert final["weights"]["digest"] != first["weights"]["digest"]  # training moved the weights between the saves
    mean = final["run"]["mismatch"]["mean_abs_logprob_diff"]
    assert 0 < mean["min"] <= mean["p50"] <= mean["max"] < final["thresholds"]["mean_abs_logprob_diff"], mean
    t, e = final["settings"]["trainer"], final["settings"]["engine"]
    assert (t["compute_dtype"], e["compute_dtype"], t["head_dtype"], e["head_dtype"]) == ("float32",) * 4
    assert t["sampler"]["temperature"] == e["sampler"]["temperature"] == 0.9  # the recipe's, on both sides
    assert final["versions"]["vllm"] and final["versions"]["trl"].startswith("1.16")
    assert final["calibration"]["thresholds"]["mean_abs_logprob_diff"]["source"] in ("calibrated", "minimum")


def test_schema_rejects_a_certificate_missing_its_binding(main_job):
    cert = certificate.load(str(main_job))
    no_weights = {k: v for k, v in cert.items() if k != "weights"}
    assert any("'weights' is a required property" in m for m in schema_errors(no_weights))
    group = next(iter(cert["weights"]["fingerprint"]))
    wide = json.loads(json.dumps(cert))
    wide["weights"]["fingerprint"][group][0] = 2**32  # checksums are mod 2**32
    assert schema_errors(wide)
    future = dict(cert, schema_version=2)
    assert certificate.validate(future) is not None


def test_verify_holds_on_the_main_job_output(main_job):
    p = subprocess.run([str(BIN / "trl-correct"), "verify", str(main_job), "--config", "recipes/tiny.yaml"],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = p.stdout
    assert "correctness gate: PASS" in out  # the gate was re-run
    rows = verify_rows(out)
    assert list(rows) == ["certificate", "run", "weights", "settings", "gate", "mean_abs_logprob_diff",
                          "p99_abs_logprob_diff", "kl_k3", "max_abs_logprob_diff"], out[-3000:]
    assert all(cells[-1] == "yes" for cells in rows.values()), rows
    assert "identical" in rows["weights"][1] and f"certificate holds: {main_job}" in out


def test_verify_names_the_weight_group_of_one_changed_element(main_job, tmp_path, capsys):
    copy = tmp_path / "model"
    shutil.copytree(main_job, copy, ignore=shutil.ignore_patterns("checkpoint-*"))
    weights = load_file(str(copy / "model.safetensors"))
    w = weights[VICTIM]
    w[0, 0] = torch.nextafter(w[0, 0], torch.tensor(float("inf")))  # one element, one ulp
    save_file(weights, str(copy / "model.safetensors"), metadata={"format": "pt"})
    assert cli(["verify", str(copy)]) == 1
    out = capsys.readouterr().out
    assert "weights: fingerprint differs in group model.layers.0.mlp.*.weight" in out, out[-2000:]
    assert "not re-run" in out and "certificate does NOT hold" in out


def test_verify_without_a_certificate_exits_2(tiny_dir, main_job, capsys):
    assert cli(["verify", tiny_dir]) == 2  # a model folder trl-correct never saved
    assert "no certificate" in capsys.readouterr().err
    assert cli(["verify", str(main_job), "--temperature", "0.5"]) == 2  # a flag against the certificate
    err = capsys.readouterr().err.strip()
    assert err == ("trl-correct verify: --temperature is invalid here: verify runs under the certificate's "
                   "temperature=0.9; drop the flag"), err


def test_fault_mid_run_under_warn_is_on_the_certificate_and_the_card(make_trainer):
    trainer = make_trainer(max_steps=3, gate="warn")
    inject(trainer, "sampler_mismatch", at_step=1)  # from step 1 the engine samples with top_k=5, the trainer without
    with pytest.warns(UserWarning, match="WITHOUT importance-sampling correction"):
        trainer.train()
    trainer.save_model()
    out = Path(trainer.args.output_dir)
    cert = certificate.load(str(out))
    assert schema_errors(cert) == []
    run = cert["run"]
    assert cert["verdict"] == "fail" and cert["gate"]["verdict"] == "pass"  # clean before step 0, broken at step 1
    assert [(f["step"], f["causes"]) for f in run["failures"]] == [(1, ["mismatch"])], run["failures"]
    assert run["failures"][0]["when"] == "on the training batch at step 1"
    assert run["uncorrected_steps"] == [1, 2] and run["steps_tis_on"] == 1 and run["steps_tis_off"] == 2
    assert "mean |Δ|" in run["failures"][0]["checks"][0]["detail"]  # the failing check's own figures
    card = (out / "README.md").read_text()
    assert "**Verdict: FAIL**" in card and "steps ran uncorrected" in card
    assert "2 of 3 training steps (steps 1-2) ran without importance-sampling correction" in card, card
    assert "Gate failure at step 1 (on the training batch at step 1): mismatch" in card


def test_lora_certificate_covers_the_merged_weights_and_verify_loads_base_plus_adapter(make_trainer, tiny_dir,
                                                                                        capfd):
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = make_trainer(peft_config=lora, max_steps=2, learning_rate=5e-3)
    trainer.train()
    trainer.save_model()
    out = Path(trainer.args.output_dir)
    assert (out / "adapter_config.json").exists() and not (out / "model.safetensors").exists()
    cert = certificate.load(str(out))
    assert schema_errors(cert) == [] and cert["verdict"] == "pass" and cert["model"]["saved_as"] == "adapter"
    engine_fp, _ = certificate.weights_fingerprint(trainer.engine_weights())
    base_fp, _ = certificate.weights_fingerprint(load_file(str(Path(tiny_dir) / "model.safetensors")).items())
    assert cert["weights"]["fingerprint"] == engine_fp and set(engine_fp) == set(base_fp)  # base names only
    moved = {g for g in base_fp if base_fp[g] != engine_fp[g]}
    assert "model.layers.0.mlp.*.weight" in moved and "model.layers.1.self_attn.*.weight" in moved, moved
    assert "model.*.weight" not in moved  # embeddings and final norm carry no adapter
    trainer.engine.close()  # free its KV cache before verify builds its own engine
    assert cli(["verify", str(out)]) == 0
    rows = verify_rows(capfd.readouterr().out)  # capfd: vLLM's engine writes to the real stdout file descriptor
    assert "identical" in rows["weights"][1] and rows["gate"][-1] == "yes", rows
