"""CorrectGRPOTrainer: TRL's GRPOTrainer with a colocated vLLM engine whose parity is proven before any correction.

Overrides (each calls super() and post-processes):
- __init__: builds the parent without its engine, then our `Engine` (engine.py) in its place.
- train: runs the gate before step 0 (on a resume: after loading the checkpoint's weights and gate history), switches
  TIS on only if it passes, writes correctness_report.json at the end.
- _save_checkpoint: adds the gate state (correctness_state.json) to every TRL checkpoint.
- save_model: after the weights, writes the parity certificate (correctness_certificate.json, fingerprinting the weights
  the engine receives) and the model card's "Training correctness" section into the folder (certificate.py): the final
  model and, through TRL's `_save_checkpoint`, every checkpoint.
- _generate_and_score_completions: at a new optimizer step, first syncs the engine itself and runs the after-sync
  checks (probe.SCHEDULE) with the policy, so TRL's own sync finds nothing to do; then measures mismatch on the real
  batch (before truncation too), drops non-finite and out-of-support tokens from the loss, checks the scored token
  ids are the engine's, and applies our TIS weights (all ones until the gate has passed).
- (not a method) when the sampler does more than temperature, the policy's fused LM head is wrapped by head.py so
  every trainer logprob is taken under the engine's exact transform.
Hooks for subclasses: engine_settings(), engine_weights(), trainer_facts(), probe_prompts(), extra_checks(probe),
correction(), on_gate_failure(). The probe, the floors and the gate's assembly (run_gate) live in probe.py's
GateRunner mixin. Public state: gate_report, calibration / thresholds, tis_enabled, step_records, failures,
last_sync_check, in_gate (a gate's own probes and audits are running), training_started.
"""

import json
import logging
import os
import warnings

import torch
from trl import GRPOTrainer

from . import certificate
from .adapters.audit import attention_default, attention_dropped, dropout_sources
from .core.calibrate import calibrate
from .config import CorrectGRPOConfig
from .adapters.engine import Engine, EngineSettings, sampler_order
from .core.facts import TrainerFacts, generation_defaults
from .core.checks import (Check, GateFailure, GateReport, clip_check, mismatch_check, missed_sync_check, non_finite_check,
                   support_check, weight_sync_check)
from .adapters.head import add_processed_head, why_unreproducible
from .core.numerics import RATIO_KEYS, is_weights, measure
from .gate import PAST_BLOCK_TOKENS, GateRunner
from .adapters.trl_api import (METRIC_LENGTH, METRIC_REWARD, PREFIX_CHECKPOINT_DIR, building_without_trl_engine, dist,
                      engine_current, get_last_checkpoint, mark_engine_current, metrics, tokenize_prompts,
                      version_guard)
from .adapters.weights import policy_weights, scoring_model

logger = logging.getLogger("trl_correct")
STATE_FILE = "correctness_state.json"  # the gate's state inside each checkpoint folder
METRIC_KEYS = ("mean_abs_logprob_diff", "p99_abs_logprob_diff", "max_abs_logprob_diff", "kl_k3", "clip_frac", "ess",
               *RATIO_KEYS)


class CorrectGRPOTrainer(GateRunner, GRPOTrainer):
    _tag_names = [*GRPOTrainer._tag_names, "trl-correct"]  # TRL's model card lists them as tags

    def __init__(self, model, reward_funcs, args: CorrectGRPOConfig | None = None, **kwargs):
        if not isinstance(args, CorrectGRPOConfig):
            raise TypeError("args must be a CorrectGRPOConfig (trl_correct.CorrectGRPOConfig), got "
                            f"{type(args).__name__}")
        path = model if isinstance(model, str) else getattr(model, "name_or_path", "")
        self.sampler_defaults_applied = args.apply_model_sampler_defaults(
            generation_defaults(path, args.trust_remote_code) if path else {})
        if self.sampler_defaults_applied:
            logger.info("trl-correct: sampler settings from the model's generation_config: %s",
                        self.sampler_defaults_applied)
        if isinstance(model, str):
            init = dict(args.model_init_kwargs or {})
            args.model_init_kwargs = attention_default(model, init, args.trust_remote_code)
            if args.model_init_kwargs != init:
                logger.info("trl-correct: attn_implementation eager (not set: the model soft-caps its attention, which "
                            "transformers' default sdpa ignores)")
        with building_without_trl_engine(args):  # the parent would build stock TRL's engine; ours replaces it below
            super().__init__(model, reward_funcs, args=args, **kwargs)
        self.use_vllm = True
        version_guard(self)
        if dist(self).fsdp_version == 1:
            raise ValueError("fsdp_version=1 is invalid: trl-correct gathers sharded weights for the engine under "
                             "FSDP2 and DeepSpeed ZeRO-3; use accelerate_configs/fsdp2.yaml (fsdp_version: 2)")
        self.sampler = args.sampler_spec(order=sampler_order())  # one spec: engine and trainer both use it
        policy = scoring_model(self.accelerator.unwrap_model(self.model))
        self.sampler_unsupported = why_unreproducible(policy, self.sampler)
        if self.sampler.transforms and not self.sampler_unsupported:
            add_processed_head(policy, self.sampler, fp32_lm_head=args.fp32_lm_head)
        self.compute_dtype = self._compute_dtype()
        self.on_gpu = self.accelerator.device.type == "cuda"
        # until the gate has measured the floors: the fixed per-dtype values (and the user's)
        self.calibration = calibrate({}, self.compute_dtype, self.on_gpu, user=args.user_thresholds(),
                                     bit_exact=args.bit_exact)
        self.thresholds = self.calibration.values()
        self.engine = None
        self.replace_engine(self.engine_settings())
        self.gate_report: GateReport | None = None
        self.tis_enabled = False  # only a passing gate switches it on
        self.step_records: list[dict] = []
        self.failures: list[dict] = []
        self.resumes: list[dict] = []  # one entry per resume: where from, and the gate state saved there
        self.in_gate = False  # a gate's own probes and audits are running (they call TRL's loss and generation too)
        self.training_started = False
        self.last_sync_check: Check | None = None
        self._synced_step = -1  # optimizer step at which the engine last received the weights
        self._fresh_shift = 0  # first-token shift of the last uncached probe (prefix-cache differential)

    def replace_engine(self, settings: EngineSettings) -> None:
        """(Re)build the colocated engine with `settings`; the next sync gives it the trainer's weights."""
        if self.engine is not None:
            self.engine.close()  # free the old engine (and its KV cache) before building the next
            self.engine = self.vllm_generation = None
        self.engine = Engine(settings, weights_fn=self.engine_weights, rank=self.accelerator.process_index,
                             world_size=self.accelerator.num_processes)
        self.engine.verify_after_sync = self.args.verify_weight_sync
        self.vllm_generation = self.engine  # TRL's loop calls generate() on it (and sync_weights(), see sync_engine)
        mark_engine_current(self, False)

    # -- hooks -----------------------------------------------------------------------------------------------------
    def engine_settings(self) -> EngineSettings:
        """How the engine is built and samples; override to change (tests use this to inject faults)."""
        a = self.args
        model = self.accelerator.unwrap_model(self.model)
        return EngineSettings(
            model=model.name_or_path, dtype=self.compute_dtype if a.vllm_dtype == "auto" else a.vllm_dtype,
            logprobs_mode=a.logprobs_mode, enable_prefix_caching=a.enable_prefix_caching,
            # the ranks of a TP group run one engine: the same seed, so they sample alike (as TRL seeds them)
            fp32_lm_head=a.fp32_lm_head, seed=self.accelerator.process_index // a.vllm_tensor_parallel_size,
            tensor_parallel_size=a.vllm_tensor_parallel_size, max_model_len=a.vllm_max_model_length,
            max_num_seqs=max(a.probe_size, a.per_device_train_batch_size * a.steps_per_generation)
            * a.vllm_tensor_parallel_size,
            gpu_memory_utilization=a.vllm_gpu_memory_utilization, trust_remote_code=a.trust_remote_code,
            enable_sleep_mode=a.vllm_enable_sleep_mode,
            cpu_kv_cache_gib=a.vllm_kv_cache_gib, sampler=self.sampler, max_tokens=self.max_completion_length,
            generation_kwargs=dict(a.generation_kwargs or {}))

    def engine_weights(self):
        """(name, tensor) pairs in checkpoint format that make up the policy, as streamed to the engine (LoRA:
        base weights with the adapters' deltas added, weights.py)."""
        if getattr(self, "_unwrapped", (None,))[0] is not self.model:  # unwrap_model reads package metadata: 2 ms
            self._unwrapped = (self.model, self.accelerator.unwrap_model(self.model))
        return policy_weights(self._unwrapped[1], dist(self))

    def trainer_facts(self) -> TrainerFacts:
        """The trainer's side of the static checks: dtypes and the sampler transform its logprobs are taken under
        (temperature in TRL's fused head; everything else in head.py's processed head)."""
        return TrainerFacts(
            compute_dtype=self.compute_dtype, head_dtype="float32" if self.args.fp32_lm_head else self.compute_dtype,
            fp32_lm_head=self.args.fp32_lm_head, sampler=self.sampler, sampler_unsupported=self.sampler_unsupported,
            sampler_defaults_applied=dict(self.sampler_defaults_applied),
            dropout=tuple(dropout_sources(self.accelerator.unwrap_model(self.model))), bit_exact=self.args.bit_exact,
            attention_dropped=attention_dropped(self.accelerator.unwrap_model(self.model)))

    def probe_prompts(self) -> list[list[int]]:
        """Token ids of the probe prompts: the first `probe_size` training prompts. With prefix caching on, each
        is lengthened past one KV block so a stale cached block would be reused (and caught)."""
        rows = [self.train_dataset[i]["prompt"] for i in range(min(self.args.probe_size, len(self.train_dataset)))]
        ids = [list(p) for p in tokenize_prompts(self, rows)]
        if self.engine.settings.enable_prefix_caching:
            filler = [t for p in ids for t in p]
            need = self.engine.facts().block_size + PAST_BLOCK_TOKENS
            ids = [(filler * (need // max(len(filler), 1) + 1))[: max(need - len(p), 0)] + p for p in ids]
        return ids

    def extra_checks(self, probe) -> list[Check]:
        """Your own gate checks, run with every full gate (before step 0, and every `probe_interval` steps) after the
        built-in ones; a failing Check blocks TIS like any other and its `name` is reported as the cause. `probe`:
        the gate's probe.ProbeResult (prompt and completion ids, trainer logprobs [B, T], counted mask, stats)."""
        return []

    def correction(self, trainer_logprobs: torch.Tensor, engine_logprobs: torch.Tensor, mask: torch.Tensor):
        """The importance weights applied once the gate passes: (weights [B, T] or [B, 1], hit [B, T] bool: tokens
        whose weight was truncated or masked). Default: TIS per `tis_mode` / `tis_cap`. Override for another
        correction; the loss audit proves it reaches the loss, and the clip share and ratio metrics follow it."""
        return is_weights(trainer_logprobs, engine_logprobs, mask, self.args.tis_mode, self.args.tis_cap)

    def on_gate_failure(self, report: GateReport, when: str) -> None:
        """Apply the gate policy to a failed report: TIS goes off in every policy; enforce saves a checkpoint (when
        training has started) and raises; warn warns loudly and trains on uncorrected; observe only logs."""
        self.tis_enabled = False
        self.failures.append({"step": self.state.global_step, "when": when, **report.to_dict()})
        if self.args.gate == "enforce":
            if self.training_started:  # keep the work done before the fault: checkpoint, then stop
                self._save_checkpoint(self.model, trial=None)
                self.failures[-1]["checkpoint"] = os.path.join(self.args.output_dir,
                                                               f"checkpoint-{self.state.global_step}")
            self.write_report()
            raise GateFailure(report, when)
        msg = f"trl-correct gate failed {when}; training continues WITHOUT importance-sampling correction.\n{report}"
        if self.args.gate == "warn":
            warnings.warn(msg, stacklevel=2)
            logger.warning(msg)
        else:
            logger.info(msg)

    # -- gate ------------------------------------------------------------------------------------------------------
    def _compute_dtype(self) -> str:
        if self.args.bf16:
            return "bfloat16"
        if self.args.fp16:
            return "float16"
        emb = self.accelerator.unwrap_model(self.model).get_input_embeddings().weight
        return str(emb.dtype).removeprefix("torch.")

    def sync_engine(self) -> Check:
        """Push the trainer's weights into the engine now and verify them (the weight_sync check). TRL's own sync
        (inside generation) then finds the engine current and does nothing."""
        count = self.engine.sync_count
        stale = self.engine.sync_weights()
        mark_engine_current(self)
        if self.engine.sync_count == count:  # nothing was streamed: whatever it answered, the engine is as it was
            self.last_sync_check = missed_sync_check(self.state.global_step, self._synced_step, called=True)
        else:
            self._synced_step = self.state.global_step
            self.last_sync_check = weight_sync_check(list(stale or []), self.engine.sync_count)
        return self.last_sync_check

    def _sync_and_check(self) -> None:
        """A new optimizer step's sync, then the checks SCHEDULE lists after it and the policy on their verdict."""
        self.sync_engine()
        step, every = self.state.global_step, self.args.probe_interval
        when = "interval" if every and step % every == 0 else "sync"
        with self.gate_phase():
            report = self.gate_checks(when).report
        if not report.passed:
            self.on_gate_failure(report, f"after the weight sync at step {step}")
        elif when == "interval" and not self.tis_enabled:
            logger.warning("trl-correct gate passes again at step %d: TIS back on", step)
            self.tis_enabled = True

    # -- training --------------------------------------------------------------------------------------------------
    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"resume_from_checkpoint=True is invalid: no checkpoint in {self.args.output_dir}; "
                                 "give a checkpoint folder")
        if resume_from_checkpoint:
            self._restore(resume_from_checkpoint)
        self.gate_report = self.run_gate()
        if self.accelerator.is_main_process:
            print(self.gate_report.table(), flush=True)
        if self.gate_report.passed:
            self.tis_enabled = True
            logger.info("trl-correct: gate PASS, TIS on (%s, cap %g)", self.args.tis_mode, self.args.tis_cap)
        else:
            self.on_gate_failure(self.gate_report, "before training")
        self.training_started = True
        try:
            return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        finally:
            self.training_started = False
            self.write_report()

    def gate_state(self) -> dict:
        """What a checkpoint keeps of the gate: verdict, thresholds, TIS on/off, every step's metrics, failures."""
        return {"step": self.state.global_step, "tis_enabled": self.tis_enabled,
                "gate": self.gate_report.to_dict() if self.gate_report else None, "thresholds": self.thresholds,
                "calibration": self.calibration.to_dict(), "steps": self.step_records, "failures": self.failures,
                "resumes": self.resumes}

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.accelerator.is_main_process:
            folder = os.path.join(self._get_output_dir(trial=trial),
                                  f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            with open(os.path.join(folder, STATE_FILE), "w") as f:
                json.dump(self.gate_state(), f, indent=2, default=str)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        super().save_model(output_dir, _internal_call=_internal_call)
        certificate.write(self, output_dir or self.args.output_dir)  # every rank: reading sharded weights is collective

    def _restore(self, checkpoint: str) -> None:
        """Load the checkpoint's weights now (so the gate syncs and probes what training resumes from) and its gate
        history. TIS stays off: only the gate that follows can switch it back on."""
        self._load_from_checkpoint(checkpoint)
        path = os.path.join(checkpoint, STATE_FILE)
        saved = {}
        if os.path.exists(path):
            with open(path) as f:
                saved = json.load(f)
            self.step_records, self.failures = saved.get("steps", []), saved.get("failures", [])
            self.resumes = saved.get("resumes", [])
        else:
            logger.warning("trl-correct: %s has no %s (not saved by trl-correct): gate history starts empty",
                           checkpoint, STATE_FILE)
        self.resumes.append({"from": checkpoint, "step": saved.get("step"),
                             "saved_gate": (saved.get("gate") or {}).get("verdict"),
                             "saved_tis_enabled": saved.get("tis_enabled")})
        self.tis_enabled = False

    def _generate_and_score_completions(self, inputs):
        if self.model.training and not engine_current(self):
            self._sync_and_check()
        out = super()._generate_and_score_completions(inputs)
        sampled = self.engine.take_sampled()
        if not self.model.training:
            return out
        step = self.state.global_step
        if self.args.verify_weight_sync and self._synced_step != step:  # generated without this step's weights
            self.on_gate_failure(GateReport((missed_sync_check(step, self._synced_step),)), f"at step {step}")
        label = f"batch at step {step}"
        identity = self._token_identity(out, sampled, label)
        mask = out["completion_mask"] if "tool_mask" not in out else out["completion_mask"] * out["tool_mask"]
        m = measure(out["old_per_token_logps"], out["sampling_per_token_logps"], mask, self.correction,
                    gather=self._gather_flat)
        stats = m.stats
        n_outside, n_nonfinite = stats["n_outside_support"], stats["n_nonfinite"]
        if n_outside or n_nonfinite:  # never train on a token the trainer cannot produce or either side cannot score
            out["completion_mask"] = out["completion_mask"] * (m.keep | ~mask.bool())
            out["old_per_token_logps"], out["sampling_per_token_logps"] = m.trainer_logprobs, m.engine_logprobs
        check = mismatch_check(stats, self.thresholds, label=label)
        failed = [c for c in (identity, support_check(n_outside, label), non_finite_check(n_nonfinite, label))
                  if not c.passed]
        if self.tis_enabled:  # a drifting gap is reported once: it switches TIS off
            failed += [c for c in (check, clip_check(stats["clip_frac"], self.args.max_clip_frac, label))
                       if not c.passed]
        if failed:
            self.on_gate_failure(GateReport(tuple(failed), stats), f"on the training batch at step {step}")
        w = m.weights
        out["importance_sampling_ratio"] = w if self.tis_enabled else torch.ones_like(w)
        gate_passed = bool(self.gate_report and self.gate_report.passed and check.passed and not failed)
        record = {"step": step, "tis_enabled": self.tis_enabled, "gate_passed": gate_passed,
                  **{k: stats[k] for k in METRIC_KEYS}, "n_tokens": stats["n_tokens"], "n_nonfinite": n_nonfinite}
        trl_metrics = metrics(self)["train"]
        for ours, trl_key in (("reward", METRIC_REWARD), ("completion_length", METRIC_LENGTH)):
            if trl_metrics.get(trl_key):  # TRL appended this batch's value (all ranks) during super()
                record[ours] = trl_metrics[trl_key][-1]
        self.step_records.append(record)
        for k in ("gate_passed", "tis_enabled", *METRIC_KEYS):
            name = f"correct/ratio/{k.removeprefix('ratio_')}" if k in RATIO_KEYS else f"correct/{k}"
            trl_metrics[name].append(float(record[k]))
        return out

    def _token_identity(self, out: dict, sampled: dict, label: str) -> Check:
        """Every scored completion must hold the token ids the engine sampled for its prompt (model tokens only)."""
        cmask = out["completion_mask"].bool()
        width = cmask.size(1)
        scored = torch.where(cmask.any(1), width - cmask.flip(1).int().argmax(1), 0).tolist()  # last scored + 1
        prompts, pmask = out["prompt_ids"].tolist(), out["prompt_mask"].bool().tolist()  # one copy, not one per row
        completions = out["completion_ids"].tolist()
        tools = out["tool_mask"].bool().tolist() if "tool_mask" in out else None
        rows = []
        for i, n in enumerate(scored):
            if not n:  # nothing of this completion is scored (e.g. a masked truncated completion)
                continue
            prompt = [t for t, keep in zip(prompts[i], pmask[i]) if keep]
            rows.append((prompt, completions[i][:n], tools[i][:n] if tools else [True] * n))
        return self._identity_check(rows, sampled, label, self.eos_token_ids)

    def _gather_flat(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate a 1-D tensor of any length from every rank."""
        if self.accelerator.num_processes == 1:
            return x
        x = x.double()
        n = self.accelerator.gather(torch.tensor([x.numel()], device=x.device))
        padded = torch.full((int(n.max()),), float("nan"), dtype=x.dtype, device=x.device)
        padded[: x.numel()] = x
        allx = self.accelerator.gather(padded)
        return allx[~torch.isnan(allx)]

    def write_report(self) -> None:
        """<output_dir>/correctness_report.json: the start gate report and every step's metrics."""
        if not self.accelerator.is_main_process:
            return
        os.makedirs(self.args.output_dir, exist_ok=True)
        data = {"gate": self.gate_report.to_dict() if self.gate_report else None, "steps": self.step_records,
                "failures": self.failures, "resumes": self.resumes, "thresholds": self.thresholds,
                "calibration": self.calibration.to_dict(), "engine": self.engine.facts().to_dict()}
        with open(os.path.join(self.args.output_dir, "correctness_report.json"), "w") as f:
            json.dump(data, f, indent=2, default=str)
