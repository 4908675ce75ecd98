"""The parity certificate: what a saved model carries of the gate that trained it.

`write(trainer, folder)` puts two things into a saved model or checkpoint folder (trainer.py's `save_model` calls it
for the final model and, through TRL's `_save_checkpoint`, for every checkpoint):

- `correctness_certificate.json` (schema: `certificate_schema.json` next to this file, `SCHEMA_VERSION`): versions and
  hardware; each side's dtype, head dtype and sampler; the gate's verdict with every check; the thresholds and how
  they were set; a run summary (quantiles over steps of mean / p99 / max |Δlogp| and k3, steps with TIS on / off,
  every failure with its step and cause, resumes); the recipe fields `trl-correct verify` rebuilds the trainer with;
  the probe prompts; and a fingerprint of the saved weights (fingerprint.py's exact bit checksum, the one the sync
  verification uses) over the weights the engine receives (`trainer.engine_weights()`: under LoRA, base + adapter
  deltas, under the base model's names), which binds the certificate to these weights.
- a "Training correctness" section in the folder's README.md (the Hugging Face model card), kept beside TRL's own
  card content: verdict, key figures, a link to the certificate, and a warning when steps ran uncorrected.

Reads the trainer's public state (gate_report, calibration, thresholds, step_records, failures, resumes, engine facts);
decides nothing and knows no vLLM internals. Checking a certificate is verify.py's.
"""

import hashlib
import json
import math
import os
import platform
import sys
from dataclasses import asdict
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from .core.calibrate import DECIDING
from .adapters.fingerprint import fingerprint, group_of
from .adapters.policy import first_prompts
from .core.checks import SHORT
from .core.sampler import SAMPLER_FIELDS, is_off

SCHEMA_VERSION = 1  # bump on any change a reader of version 1 would misread; certificate_schema.json says what it is
CERTIFICATE_FILE = "correctness_certificate.json"
SCHEMA_FILE = Path(__file__).with_name("certificate_schema.json")
CARD_FILE = "README.md"
CARD_BEGIN = "<!-- trl-correct: training correctness (generated; replaced on every save) -->"
CARD_END = "<!-- trl-correct: end -->"
# Quantiles over steps of each per-step statistic in the run summary (q = 0: min, 1: max).
STEP_QUANTILES = {"min": 0.0, "p50": 0.5, "p90": 0.9, "max": 1.0}
STEP_STATS = ("mean_abs_logprob_diff", "p99_abs_logprob_diff", "max_abs_logprob_diff", "kl_k3")
# mixture-of-experts runs: quantiles over steps of each batch's routing figures (records.ROUTING_METRIC_KEYS)
ROUTING_STATS = ("flip_frac_token_layer", "flip_frac_token")
# The recipe fields that decide what the gate compares and how (dtypes, sampler, head, engine semantics, thresholds,
# probe, loss, batch shape): `trl-correct verify` rebuilds the trainer with exactly these values.
CONFIG_FIELDS = ("bf16", "fp16", "seed", "temperature", "top_k", "top_p", "min_p", "repetition_penalty",
                 "presence_penalty", "frequency_penalty", "sampler_defaults", "generation_kwargs", "fp32_lm_head",
                 "logprobs_mode", "vllm_dtype", "enable_prefix_caching", "verify_weight_sync", "bit_exact", "calibrate",
                 "max_mean_abs_logprob_diff", "max_p99_abs_logprob_diff", "max_kl_k3", "max_max_abs_logprob_diff",
                 "max_clip_frac", "tis_mode", "tis_cap", "gate", "probe_size", "probe_tokens", "probe_interval",
                 "loss_type", "beta", "max_completion_length", "per_device_train_batch_size", "num_generations",
                 "steps_per_generation", "vllm_max_model_length", "trust_remote_code", "model_init_kwargs",
                 "routing_replay")
FINGERPRINT_ALGORITHM = ("per parameter group (parent module.*.leaf): sum of the tensors' bit patterns mod 2**32 and "
                         "element count (trl_correct/fingerprint.py, as the weight-sync verification)")


# -- building -------------------------------------------------------------------------------------------------------

def weights_fingerprint(named_tensors) -> tuple[dict, dict]:
    """(fingerprint {group: [checksum, count]}, {group: dtype}) of (name, tensor) pairs, as the sync verification
    takes it (fingerprint.py), in the dtype each tensor has."""
    dtypes = {}

    def tap():
        for name, t in named_tensors:
            dtypes[group_of(name)] = str(t.dtype).removeprefix("torch.")
            yield name, t

    return fingerprint(tap()), dtypes


def digest(fp: dict) -> str:
    """A short name for a fingerprint: sha256 of its canonical JSON, first 16 hex digits."""
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]


def build(trainer, fp: dict, dtypes: dict) -> dict:
    """The certificate of `trainer`'s run as it stands, for weights with fingerprint `fp`."""
    gate = trainer.gate_report.to_dict() if trainer.gate_report is not None else None
    run = run_summary([r.to_dict() for r in trainer.step_records], [f.to_dict() for f in trainer.failures],
                      [r.to_dict() for r in trainer.resumes])
    verdict = ("ungated" if gate is None
               else "pass" if gate["verdict"] == "pass" and not run["failures"] and not run["steps_tis_off"]
               else "fail")
    engine = _jsonable(trainer.engine.facts().to_dict())
    cert = {
        "schema_version": SCHEMA_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "verdict": verdict,
        "summary": summary_line(verdict, gate, run, trainer.args),
        "model": model_info(trainer),
        "versions": versions(engine.get("vllm_version", "")),
        "hardware": hardware(trainer),
        "settings": {
            "trainer": facts_dict(trainer.trainer_facts()),
            "engine": engine,
            "config": {k: _jsonable(getattr(trainer.args, k, None)) for k in CONFIG_FIELDS},
            "probe_prompts": [_jsonable(p) for p in first_prompts(trainer)],
        },
        "gate": gate,
        "thresholds": dict(trainer.gate.thresholds),
        "calibration": trainer.gate.calibration.to_dict(),
        "run": run,
        "weights": {"algorithm": FINGERPRINT_ALGORITHM, "covers": _covers(trainer), "fingerprint": fp,
                    "dtypes": dtypes, "n_groups": len(fp), "n_elements": sum(c for _, c in fp.values()),
                    "digest": digest(fp)},
    }
    return _finite(cert)


def run_summary(step_records: list, failures: list, resumes: list) -> dict:
    """Per-step mismatch as quantiles over steps, the steps with the correction on / off, every failure and resume;
    for a mixture-of-experts run, `routing`: each batch's routing flip shares as quantiles over steps (and with replay
    on, the share of replayed token-layers computed with other experts than the engine's)."""
    steps = sorted({r["step"] for r in step_records})
    off = sorted({r["step"] for r in step_records if not r["tis_enabled"]})
    mismatch = {}
    for stat in STEP_STATS:
        values = sorted(float(r[stat]) for r in step_records if r.get(stat) is not None and math.isfinite(r[stat]))
        mismatch[stat] = {name: _quantile(values, q) for name, q in STEP_QUANTILES.items()}
    routed = [r["routing"] for r in step_records if r.get("routing")]
    routing = {}
    for stat in ROUTING_STATS if routed else ():
        values = sorted(float(x[stat]) for x in routed if x.get(stat) is not None)
        routing[stat] = {name: _quantile(values, q) for name, q in STEP_QUANTILES.items()}
    replayed = sorted(float(x["replay"]["flip_frac_token_layer"]) for x in routed if x.get("replay"))
    if replayed:
        routing["replay_flip_frac_token_layer"] = {name: _quantile(replayed, q) for name, q in STEP_QUANTILES.items()}
    return {**({"routing": routing} if routing else {}),
        "steps": len(steps), "batches": len(step_records), "steps_tis_on": len(steps) - len(off),
        "steps_tis_off": len(off), "uncorrected_steps": off,
        "steps_gate_failed": sorted({r["step"] for r in step_records if not r["gate_passed"]}),
        "mismatch": mismatch,
        "failures": [{"step": f["step"], "when": f["when"], "causes": list(f["causes"]),
                      "checks": [{k: c[k] for k in ("name", "detail", "fix")} for c in f["checks"] if not c["passed"]],
                      **({"checkpoint": f["checkpoint"]} if f.get("checkpoint") else {})} for f in failures],
        "resumes": [dict(r) for r in resumes],
    }


def _quantile(sorted_values: list, q: float) -> float | None:
    """Linear-interpolation quantile of an ascending list; None when empty."""
    if not sorted_values:
        return None
    pos = q * (len(sorted_values) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summary_line(verdict: str, gate: dict | None, run: dict, args) -> str:
    if verdict == "ungated":
        return "the correctness gate never ran on this trainer: nothing is certified"
    if verdict == "pass":
        return (f"gate passed before step 0; all {run['steps']} steps ran with the correction ({args.tis_mode}, cap "
                f"{args.tis_cap:g}) against a verified engine")
    why = [f"gate failed before step 0 ({', '.join(gate['causes'])})"] if gate["verdict"] != "pass" else []
    why += [f"gate failed at step {f['step']} ({', '.join(f['causes'])})" for f in run["failures"]
            if not (gate["verdict"] != "pass" and f["when"] == "before training")]
    return (f"{run['steps_tis_off']} of {run['steps']} steps ran WITHOUT correction "
            f"(steps {compact(run['uncorrected_steps']) or '-'}): " + "; ".join(why))


def compact(steps: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    parts, start = [], None
    for i, s in enumerate(steps):
        if start is None:
            start = s
        if i + 1 == len(steps) or steps[i + 1] != s + 1:
            parts.append(str(start) if start == s else f"{start}-{s}")
            start = None
    return ", ".join(parts)


def facts_dict(facts) -> dict:
    """A facts dataclass (facts.py) as JSON values."""
    d = facts.to_dict() if hasattr(facts, "to_dict") else asdict(facts)
    d["sampler"] = facts.sampler.to_dict()
    return _jsonable(d)


def model_info(trainer) -> dict:
    from .adapters.weights import is_peft_model

    model = trainer.accelerator.unwrap_model(trainer.model)
    peft = None
    if is_peft_model(model):
        cfg = model.peft_config[model.active_adapter]
        peft = {k: _jsonable(getattr(cfg, k, None)) for k in ("peft_type", "r", "lora_alpha", "lora_dropout",
                                                              "target_modules", "base_model_name_or_path")}
    return {"name_or_path": str(model.name_or_path), "saved_as": "adapter" if peft else "full", "peft": peft,
            "global_step": int(trainer.state.global_step)}


def _covers(trainer) -> str:
    from .adapters.weights import is_peft_model

    if is_peft_model(trainer.accelerator.unwrap_model(trainer.model)):
        return ("the engine's weights: base weights with every active LoRA adapter's delta added, under the base "
                "model's names (the adapter's own tensors are not in it)")
    return "the engine's weights: every parameter of the policy, under its checkpoint name"


def versions(vllm_version: str = "") -> dict:
    out = {"python": platform.python_version()}
    for name, dist in (("torch", "torch"), ("trl", "trl"), ("transformers", "transformers"),
                       ("accelerate", "accelerate"), ("trl_correct", "trl-correct"), ("peft", "peft")):
        try:
            out[name] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[name] = None
    out["vllm"] = vllm_version or None
    return out


def hardware(trainer=None) -> dict:
    import torch

    device = trainer.accelerator.device.type if trainer is not None else ("cuda" if torch.cuda.is_available()
                                                                            else "cpu")
    out = {"device": device, "world_size": trainer.accelerator.num_processes if trainer is not None else 1,
           "platform": platform.platform(), "machine": platform.machine(), "cpu_count": os.cpu_count(),
           "gpu": None, "gpu_capability": None, "cuda": torch.version.cuda}
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
        major, minor = torch.cuda.get_device_capability()
        out["gpu_capability"] = f"sm{major}{minor}"
    return out


def _jsonable(v):
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, set, frozenset)):
        items = [_jsonable(x) for x in v]
        return sorted(items, key=str) if isinstance(v, (set, frozenset)) else items
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return str(v).removeprefix("torch.")  # a torch.dtype, an enum, a path


def _finite(v):
    """NaN / inf become null (strict JSON has neither)."""
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_finite(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


# -- writing ----------------------------------------------------------------------------------------------------------

def write(trainer, folder: str) -> dict | None:
    """Fingerprint the policy as the engine receives it (every rank: under ZeRO-3 / FSDP2 reading the weights is a
    collective), then, on the main process, write the certificate and the model card section into `folder`.
    Returns the certificate (None on other ranks)."""
    fp, dtypes = weights_fingerprint(trainer.engine_weights())
    if not trainer.accelerator.is_main_process:
        return None
    cert = build(trainer, fp, dtypes)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, CERTIFICATE_FILE), "w") as f:
        json.dump(cert, f, indent=2, allow_nan=False)
    path = os.path.join(folder, CARD_FILE)
    base = Path(path).read_text() if os.path.exists(path) else trl_card(trainer)
    Path(path).write_text(with_section(base, card_section(cert)))
    return cert


def trl_card(trainer) -> str:
    """TRL's own model card, as its GRPOTrainer writes one at every checkpoint (into output_dir: read from there)."""
    name = (trainer.args.hub_model_id or trainer.args.output_dir).rstrip("/").split("/")[-1]
    trainer.create_model_card(model_name=name)
    return Path(os.path.join(trainer.args.output_dir, CARD_FILE)).read_text()


def with_section(card: str, section: str) -> str:
    """`card` with its trl-correct section replaced by `section` (appended when it has none)."""
    if CARD_BEGIN in card:
        head, _, rest = card.partition(CARD_BEGIN)
        _, _, tail = rest.partition(CARD_END)
        card = head.rstrip("\n") + "\n" + tail.lstrip("\n")
    return card.rstrip("\n") + "\n\n" + section


def sampler_words(sampler: dict) -> str:
    """'T=0.9' plus every setting that is not off, e.g. 'T=0.7, top_k=20, top_p=0.8'."""
    on = [f"{k}={sampler[k]:g}" for k in SAMPLER_FIELDS if k != "temperature" and not is_off(k, sampler.get(k))]
    return ", ".join([f"T={sampler['temperature']:g}", *on])


def figure(x) -> str:
    """A figure of the certificate in three significant digits; '-' where none was recorded."""
    return "-" if x is None else f"{x:.3g}"


def gate_words(gate: dict | None) -> str:
    """A gate report's verdict in a few words: 'pass (16 checks)', 'fail (16 checks; failed: mismatch)'."""
    if gate is None:
        return "not run"
    return f"{gate['verdict']} ({len(gate['checks'])} checks" + (
        f"; failed: {', '.join(gate['causes'])})" if gate["causes"] else ")")


def card_section(cert: dict) -> str:
    """The model card's 'Training correctness' section (markdown) for a certificate."""
    run, gate, s = cert["run"], cert["gate"], cert["settings"]
    t, e = s["trainer"], s["engine"]
    verdict = {"pass": "PASS", "fail": "FAIL", "ungated": "NOT GATED"}[cert["verdict"]]
    lines = [CARD_BEGIN, "## Training correctness", "",
             f"**Verdict: {verdict}** — {cert['summary']}.", ""]
    if run["uncorrected_steps"]:
        lines += [f"> **Warning: steps ran uncorrected.** {run['steps_tis_off']} of {run['steps']} training steps "
                  f"(steps {compact(run['uncorrected_steps'])}) ran without importance-sampling correction against an "
                  "engine whose parity with the trainer was not established.", ">"]
    lines += [f"> - Gate failure at step {f['step']} ({f['when']}): {', '.join(f['causes'])}" + (
        f" — {f['checks'][0]['detail']}" if f["checks"] else "") for f in run["failures"]]
    if run["uncorrected_steps"] or run["failures"]:
        lines += [""]
    m = run["mismatch"]
    gate_row = gate_words(gate)
    thresholds = ", ".join(f"{SHORT.get(k, k)} {figure(cert['thresholds'].get(k))}" for k in DECIDING)
    rows = [
        ("correctness gate before step 0", gate_row),
        ("steps (TIS on / off)", f"{run['steps']} ({run['steps_tis_on']} / {run['steps_tis_off']})"),
        ("mean \\|Δlogp\\| per step (median / max)",
         f"{figure(m['mean_abs_logprob_diff']['p50'])} / {figure(m['mean_abs_logprob_diff']['max'])}"),
        ("p99 \\|Δlogp\\| per step (median / max)",
         f"{figure(m['p99_abs_logprob_diff']['p50'])} / {figure(m['p99_abs_logprob_diff']['max'])}"),
        ("max \\|Δlogp\\| over the run", figure(m["max_abs_logprob_diff"]["max"])),
        ("k3 KL per step (median / max)", f"{figure(m['kl_k3']['p50'])} / {figure(m['kl_k3']['max'])}"),
        *([("MoE routing flips per step, token-layers (median / max)",
            f"{figure(run['routing']['flip_frac_token_layer']['p50'])} / "
            f"{figure(run['routing']['flip_frac_token_layer']['max'])}"
            + ("; routing replay on" if "replay_flip_frac_token_layer" in run["routing"] else ""))]
          if run.get("routing") else []),
        ("thresholds", f"{thresholds} ({cert['calibration']['summary']})"),
        ("dtype (trainer / engine)", f"{t['compute_dtype']} / {e['compute_dtype']}; lm_head {t['head_dtype']} / "
                                     f"{e['head_dtype']}"),
        ("sampler (trainer / engine)", f"{sampler_words(t['sampler'])} / {sampler_words(e['sampler'])}"),
        ("gate failures", str(len(run["failures"]))), ("resumes", str(len(run["resumes"]))),
        ("versions", ", ".join(f"{k} {v}" for k, v in cert["versions"].items() if v)),
        ("hardware", f"{cert['hardware']['device']}" + (f" ({cert['hardware']['gpu']})" if cert["hardware"]["gpu"]
                                                        else "") + f", {cert['hardware']['world_size']} process(es)"),
        ("weights fingerprint", f"{cert['weights']['digest']} ({cert['weights']['n_groups']} groups, "
                                f"{cert['weights']['n_elements']:,} elements)"),
    ]
    lines += ["| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], "",
              f"Certificate (schema version {cert['schema_version']}): [{CERTIFICATE_FILE}]({CERTIFICATE_FILE}). "
              "Re-check it against these weights on your machine: `trl-correct verify <this folder>` (exit 0: it "
              "holds, 1: it does not, 2: no certificate).", CARD_END, ""]
    return "\n".join(lines)


def load(folder: str) -> dict | None:
    """The certificate in `folder`, or None when there is none."""
    path = os.path.join(folder, CERTIFICATE_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def schema() -> dict:
    return json.loads(SCHEMA_FILE.read_text())


def validate(cert: dict) -> str | None:
    """Why `cert` does not match the schema (one line), or None when it does. Needs the jsonschema package."""
    try:
        import jsonschema
    except ImportError:
        print("trl-correct: jsonschema is not installed; the certificate's shape is not validated", file=sys.stderr)
        return None
    err = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(schema()).iter_errors(cert))
    if err is None:
        return None
    where = "/".join(str(p) for p in err.absolute_path) or "(top level)"
    return f"{where}: {err.message}"
