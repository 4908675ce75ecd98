"""`trl-correct verify PATH`: does the parity certificate of a saved model or checkpoint hold, here and now?

    trl-correct verify PATH [--config RECIPE] [recipe flags]

PATH is a folder written by the trainer's save_model (the main job's output_dir) or a checkpoint of it. Checked in
this order, one row each:

1. certificate  PATH/correctness_certificate.json exists (else exit 2) and matches its schema (certificate_schema.json).
2. run          the certificate's own verdict is pass: the gate passed before step 0 and no step ran uncorrected (a
                run that trained without the correction is not certified, whatever the rest shows).
3. weights      the weights in PATH, loaded as the trainer loads them (an adapter on its base model), fingerprinted as
                the engine receives them (base + adapter deltas under PEFT), equal the certificate's fingerprint in
                every group (exact: fingerprint.py's bit checksums). When they differ the engine is not built: no
                gate run can certify other weights.
4. settings     a trainer and a colocated engine rebuilt under the certificate's settings (its `settings.config`) run
                with the certificate's dtypes, head dtypes, logprobs mode and sampler on each side.
5. gate         the whole gate before step 0, re-run on these weights, passes.
6. figures      (rows mean_abs_logprob_diff, p99_abs_logprob_diff, kl_k3, max_abs_logprob_diff) tolerance rule:
                the re-run probe's mean, p99 and max |Δlogp| and k3 KL are each within the certificate's thresholds
                (those the run was held to; the re-run gate also holds them to its own calibration, row 5). The
                certificate's figures (its gate before step 0) are shown beside them.

Different versions or hardware are listed as notes, never failures: re-checking on another machine is the point.
Exit code: 0 the certificate holds; 1 it does not (the last line names each row that failed and why); 2 PATH has no
certificate, or the arguments are unusable.

--config RECIPE gives the prompts (dataset_name, prompt_column, chat_prompts) and reward functions, and engine
memory fields (vllm_kv_cache_gib, vllm_gpu_memory_utilization); without it the certificate's own probe prompts are
the dataset. The certificate's settings override the recipe (each change printed); a flag that contradicts them is
an error. An adapter loads on its adapter_config.json base_model_name_or_path unless --model_name_or_path is given.

Knows the certificate (certificate.py) and the trainer; nothing of vLLM beyond what the trainer builds.
"""

import argparse
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass

from .. import certificate, checkpoints
from ..certificate import figure, gate_words
from ..core.calibrate import DECIDING
from ..core.checks import SHORT
from ..errors import ConfigError
from . import ArgumentParser

ADAPTER_FILE = "adapter_config.json"  # PEFT's: the folder holds an adapter, not a whole model
# Fields verify sets whatever the recipe says: it builds a trainer to gate, never to train or save.
VERIFY_ONLY = dict(max_steps=1, save_strategy="no", report_to="none", logging_steps=1, disable_tqdm=True,
                   resume_from_checkpoint=None, push_to_hub=False)
# Facts compared between the certificate and the rebuilt pair (the sampler without `order`: the gate checks that).
TRAINER_FACTS = ("compute_dtype", "head_dtype", "fp32_lm_head", "sampler")
ENGINE_FACTS = ("compute_dtype", "head_dtype", "logprobs_mode", "sampler", "prefix_caching", "async_scheduling")


class UsageError(ConfigError):
    """Arguments verify cannot run with (exit 2)."""


@dataclass
class Row:
    name: str
    certified: str
    here: str
    holds: bool | None  # None: not checked (an earlier row decided)
    why: str = ""


def no_reward(completions, **kwargs) -> list[float]:
    """The reward of a verify run: none (nothing is trained; TRL needs a reward function to build)."""
    return [0.0] * len(completions)


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog="trl-correct verify", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", help="a saved model or checkpoint folder")
    ap.add_argument("--config", help="recipe YAML: prompts, rewards, engine memory (optional)")
    a, flags = ap.parse_known_args(argv)
    from .train import check_flags

    check_flags(flags)  # recipe flags: each names a field (errors.RecipeError, exit 2)
    if not os.path.isdir(a.path):
        print(f"trl-correct verify: no certificate: {a.path} is not a folder; give a saved model or checkpoint folder",
              file=sys.stderr)
        return 2
    cert = certificate.load(a.path)
    if cert is None:
        print(f"trl-correct verify: no certificate: {a.path} has no {certificate.CERTIFICATE_FILE} (trl-correct writes "
              "one into every model it saves and every checkpoint)", file=sys.stderr)
        return 2
    if checkpoints.CHECKPOINT_RE.match(os.path.basename(os.path.normpath(a.path))):
        why = checkpoints.why_partial(a.path)
        if why:
            print(f"trl-correct verify: {a.path} is a partial checkpoint ({why}); verify a whole checkpoint or the "
                  "final model", file=sys.stderr)
            return 2
    try:
        rows, notes = check(a.path, cert, a.config, flags)
    except UsageError as e:
        print(f"trl-correct verify: {e}", file=sys.stderr)
        return 2
    print(table(rows, notes))
    failed = [r for r in rows if r.holds is False]
    if failed:
        print("certificate does NOT hold: " + "; ".join(f"{r.name}: {r.why}" for r in failed))
        return 1
    print(f"certificate holds: {a.path}")
    return 0


def check(path: str, cert: dict, recipe: str | None, flags: list[str]) -> tuple[list[Row], list[str]]:
    """Every row of the module docstring, in order; (rows, notes)."""
    invalid = certificate.validate(cert)
    rows = [Row("certificate", f"schema v{cert.get('schema_version')}, {cert.get('created', '?')}",
                "invalid" if invalid else "valid", invalid is None, f"does not match its schema: {invalid}")]
    if invalid:
        return rows, []
    run = cert["run"]
    rows.append(Row("run", f"{cert['verdict']}: {run['steps_tis_on']}/{run['steps']} steps corrected, "
                           f"{len(run['failures'])} gate failure(s)", "-", cert["verdict"] == "pass", cert["summary"]))
    notes: list[str] = []
    out_dir = tempfile.mkdtemp(prefix="trl-correct-verify-")
    trainer = None
    try:
        trainer = build_verifier(path, cert, recipe, flags, out_dir, notes)
        got, dtypes = certificate.weights_fingerprint(trainer.engine_weights())
        rows.append(weights_row(cert["weights"], got, dtypes))
        if not rows[-1].holds:
            rows.append(Row("gate", gate_words(cert["gate"]), "not re-run: the weights are not the certified ones",
                            None))
            return rows, notes + environment_notes(cert, None)
        trainer.build_engine()
        report = trainer.run_gate()
        print(report.table(), flush=True)
        rows.append(settings_row(cert["settings"], trainer))
        rows.append(Row("gate", gate_words(cert["gate"]), gate_words(report.to_dict()), report.passed,
                        f"the re-run gate fails ({', '.join(report.causes)})"))
        rows += figure_rows(cert, report.mismatch)
        notes += environment_notes(cert, trainer.engine.facts().vllm_version)
        return rows, notes
    finally:
        if trainer is not None and trainer.engine is not None:
            trainer.engine.close()
        shutil.rmtree(out_dir, ignore_errors=True)


# -- building the trainer under the certificate's settings ---------------------------------------------------------

def _verifier_class():
    from ..trainer import CorrectGRPOTrainer

    class Verifier(CorrectGRPOTrainer):
        """A CorrectGRPOTrainer whose engine is built by `build_engine()`, after the weights are known to be the
        certified ones (no engine is needed to find that they are not)."""

        _engine_deferred = True

        def replace_engine(self, settings):
            if self._engine_deferred:  # the call from __init__
                self._engine_deferred = False
                return
            super().replace_engine(settings)

        def build_engine(self):
            self.replace_engine(self.engine_settings())

    return Verifier


def build_verifier(path: str, cert: dict, recipe: str | None, flags: list[str], out_dir: str, notes: list[str]):
    """A trainer for the weights in `path` under the certificate's settings (recipe and flags for the rest)."""
    import yaml

    from .train import load_prompts, load_recipe, load_reward, parse, resolve_model

    certified = cert["settings"]["config"]
    given = {f.removeprefix("--").split("=")[0] for f in flags if f.startswith("--")}
    clash = sorted(given & set(certified))
    if clash:
        raise UsageError(f"--{clash[0]} is invalid here: verify runs under the certificate's "
                         f"{clash[0]}={certified[clash[0]]!r}; drop the flag")
    values = {}
    if recipe:
        values = dict(load_recipe(recipe))  # the file, its syntax, a mapping, known fields, their types: one line each
        for k, v in (values.pop("env", None) or {}).items():  # as TRL's parser does
            os.environ[k] = str(v)
    for k, v in certified.items():
        if k in values and values[k] != v:
            notes.append(f"{k}: the recipe's {values[k]!r} replaced by the certificate's {v!r}")
    values.pop("generation_batch_size", None)  # the certificate's steps_per_generation decides it
    values.update(certified, output_dir=out_dir, **VERIFY_ONLY)
    merged = os.path.join(out_dir, "recipe.yaml")
    with open(merged, "w") as f:
        yaml.safe_dump(values, f)
    script_args, args, model_args = parse(["--config", merged, *flags])
    if recipe or "dataset_name" in given:
        dataset, rewards = load_prompts(script_args), [load_reward(r) for r in script_args.reward_funcs]
    else:
        from datasets import Dataset

        dataset, rewards = Dataset.from_list([{"prompt": p} for p in cert["settings"]["probe_prompts"]]), [no_reward]
    model = path
    if os.path.exists(os.path.join(path, ADAPTER_FILE)):
        model = load_adapter(path, resolve_model(model_args.model_name_or_path) if "model_name_or_path" in given
                             else None, args)
    return _verifier_class()(model=model, reward_funcs=rewards, args=args, train_dataset=dataset)


def load_adapter(path: str, base: str | None, args):
    """The PEFT adapter in `path` on its base model (`base`, or the adapter's base_model_name_or_path), loaded as TRL
    loads a policy (model_init_kwargs, float32 unless they say otherwise), trainable as in training."""
    from peft import PeftConfig, PeftModel
    from ..adapters.trl_api import create_model_from_path

    from .train import resolve_model

    base = base or resolve_model(PeftConfig.from_pretrained(path).base_model_name_or_path)
    init = dict(args.model_init_kwargs or {})
    init.setdefault("trust_remote_code", args.trust_remote_code)
    try:
        model = create_model_from_path(base, **init)
    except OSError as e:
        raise UsageError(f"--model_name_or_path is needed: the adapter's base model {base!r} cannot be loaded here "
                         f"({str(e).splitlines()[0]}); give the base model's folder or hub name") from None
    args.model_init_kwargs = None  # used here; TRL would warn that an instantiated model ignores them
    return PeftModel.from_pretrained(model, path, is_trainable=True)


# -- rows -----------------------------------------------------------------------------------------------------------

def weights_row(certified: dict, got: dict, dtypes: dict) -> Row:
    want = certified["fingerprint"]
    differ = [g for g in sorted(set(want) | set(got)) if list(want.get(g, [])) != list(got.get(g, []))]
    here = f"{certificate.digest(got)} ({len(got)} groups, {sum(c for _, c in got.values()):,} elements)"
    cert_str = f"{certified['digest']} ({certified['n_groups']} groups, {certified['n_elements']:,} elements)"
    if not differ:
        return Row("weights", cert_str, here + ": identical", True)
    words = []
    for g in differ[:3]:
        if g not in got:
            words.append(f"{g} (missing here)")
        elif g not in want:
            words.append(f"{g} (not in the certificate)")
        elif want[g][1] != got[g][1]:
            words.append(f"{g} ({got[g][1]} elements here, {want[g][1]} certified)")
        elif certified["dtypes"].get(g) not in (None, dtypes.get(g)):
            words.append(f"{g} (dtype {dtypes.get(g)} here, {certified['dtypes'][g]} certified)")
        else:
            words.append(g)
    more = f" (+{len(differ) - 3} more)" if len(differ) > 3 else ""
    why = f"fingerprint differs in group{'s' if len(differ) > 1 else ''} {', '.join(words)}{more}"
    return Row("weights", cert_str, here, False, why)


def _without_order(v):
    return {k: x for k, x in v.items() if k != "order"} if isinstance(v, dict) else v


def settings_row(certified: dict, trainer) -> Row:
    here = {"trainer": certificate.facts_dict(trainer.trainer_facts()),
            "engine": certificate.facts_dict(trainer.engine.facts())}
    diffs = []
    for side, keys in (("trainer", TRAINER_FACTS), ("engine", ENGINE_FACTS)):
        for k in keys:
            want, got = _without_order(certified[side].get(k)), _without_order(here[side].get(k))
            if want != got:
                diffs.append(f"{side} {k}: {want} certified, {got} here")
    t, e = certified["trainer"], certified["engine"]
    summary = (f"{t['compute_dtype']}/{e['compute_dtype']}, head {t['head_dtype']}/{e['head_dtype']}, "
               f"{certificate.sampler_words(t['sampler'])}")
    return Row("settings", summary, "the same" if not diffs else "; ".join(diffs[:2]), not diffs,
               "; ".join(diffs))


def figure_rows(cert: dict, mismatch: dict) -> list[Row]:
    """One row per deciding statistic: the re-run probe's figure within the certificate's threshold."""
    rows = []
    certified = (cert["gate"] or {}).get("mismatch", {})
    for stat in DECIDING:
        limit, got = cert["thresholds"][stat], mismatch.get(stat)
        ok = got is not None and got <= limit
        rows.append(Row(stat,
                        figure(certified.get(stat)), f"{figure(got)} (limit {limit:.3g})", ok,
                        f"re-run {SHORT[stat]} {figure(got)} is over the certificate's threshold {limit:.3g}"))
    return rows


def environment_notes(cert: dict, vllm_version: str | None) -> list[str]:
    """Where this machine differs from the certificate's (versions; vLLM only once an engine ran; device, GPU)."""
    now = certificate.versions(vllm_version or "")
    notes = [f"{k} {v} in the certificate, {now.get(k)} here" for k, v in cert["versions"].items()
             if v != now.get(k) and (k != "vllm" or vllm_version)]
    hw = certificate.hardware()
    for k in ("device", "gpu"):
        if cert["hardware"].get(k) != hw.get(k):
            notes.append(f"{k} {cert['hardware'].get(k)} in the certificate, {hw.get(k)} here")
    return notes


def table(rows: list[Row], notes: list[str]) -> str:
    head = ("check", "certificate", "here (re-run)", "holds")
    cells = [head] + [(r.name, r.certified, r.here, {True: "yes", False: "NO", None: "-"}[r.holds]) for r in rows]
    widths = [min(max(len(c[i]) for c in cells), 60) for i in range(3)]
    lines = [" | ".join(c[i].ljust(widths[i]) if i < 3 else c[i] for i in range(4)) for c in cells]
    lines.insert(1, "-+-".join("-" * w for w in (*widths, 5)))
    lines += [f"note: {n}" for n in notes]
    return "\n".join(lines)
