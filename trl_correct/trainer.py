"""CorrectGRPOTrainer: TRL's GRPOTrainer with a colocated vLLM engine whose parity is proven before any correction.

TRL's hooks and the policy (enforce / warn / observe, TIS on or off); the gate is a component (gate.py). Overrides,
each calling super(): __init__ (our Engine and Gate in place of TRL's engine), train (the gate before step 0, after a
resume's weights and history are loaded), _generate_and_score_completions (gate.after_sync at a new step, then
gate.on_batch on TRL's batch: unscorable tokens leave the loss; our importance weights, all ones until the gate has
passed), _save_checkpoint and save_model (the gate state; the parity certificate). Hooks for subclasses:
engine_settings(), engine_weights(), trainer_facts(), probe_prompts(), extra_checks(probe), correction(),
on_gate_failure(). Public state: gate, gate_report, tis_enabled, step_records, failures, resumes, in_gate.
"""

import json
import logging
import os
import warnings

import torch
from trl import GRPOTrainer

from . import certificate, checkpoints
from .adapters.audit import attention_dropped, dropout_sources, model_defaults
from .adapters.engine import Engine, EngineSettings, sampler_order
from .adapters.head import add_processed_head, why_unreproducible
from .adapters.policy import PolicySide
from .adapters.trl_api import (METRIC_LENGTH, METRIC_REWARD, building_without_trl_engine, checkpoint_folder, dist,
                               engine_current, load_checkpoint_weights, mark_engine_current,
                               metrics, tag_names, version_guard)
from .adapters.weights import policy_weights, scoring_model
from .config import CorrectGRPOConfig
from .core.checks import Check, GateFailure, GateReport
from .core.facts import TrainerFacts
from .core.numerics import is_weights
from .core.records import Failure, Resume, StepRecord
from .gate import Gate, GateRun

logger = logging.getLogger("trl_correct")
STATE_FILE = checkpoints.STATE_FILE  # the gate's state inside each checkpoint folder


class CorrectGRPOTrainer(GRPOTrainer):
    _tag_names = tag_names("trl-correct")  # TRL's model card lists them as tags

    def __init__(self, model, reward_funcs, args: CorrectGRPOConfig | None = None, **kwargs):
        if not isinstance(args, CorrectGRPOConfig):
            raise TypeError("args must be a CorrectGRPOConfig (trl_correct.CorrectGRPOConfig), got "
                            f"{type(args).__name__}")
        self.sampler_defaults_applied = model_defaults(model, args)
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
        self.engine = None
        self.gate = Gate(None, PolicySide(self), args, self.compute_dtype, self.on_gpu)
        self.replace_engine(self.engine_settings())
        self.gate_report: GateReport | None = None
        self.tis_enabled = False  # only a passing gate switches it on
        self.step_records: list[StepRecord] = []
        self.failures: list[Failure] = []
        self.resumes: list[Resume] = []  # one entry per resume: where from, and the gate state saved there
        self.training_started = False

    def replace_engine(self, settings: EngineSettings) -> None:
        """(Re)build the colocated engine with `settings`; the next sync gives it the trainer's weights."""
        if self.engine is not None:
            self.engine.close()  # free the old engine (and its KV cache) before building the next
            self.engine = self.vllm_generation = None
        self.engine = self.gate.engine = Engine(settings, weights_fn=self.engine_weights,
                                                rank=self.accelerator.process_index,
                                                world_size=self.accelerator.num_processes)
        self.engine.verify_after_sync = self.args.verify_weight_sync
        self.vllm_generation = self.engine  # TRL's loop calls generate() on it (its own sync finds nothing to do)
        mark_engine_current(self, False)

    @property
    def in_gate(self) -> bool:
        """True while the gate runs its own probes and audits (they call TRL's loss and generation too)."""
        return self.gate.policy.running

    # -- hooks -----------------------------------------------------------------------------------------------------
    def engine_settings(self) -> EngineSettings:
        """How the engine is built and samples; override to change (tests use this to inject faults)."""
        return EngineSettings.from_config(self.args, self.accelerator.unwrap_model(self.model).name_or_path,
                                          self.compute_dtype, self.accelerator.process_index, self.sampler,
                                          self.max_completion_length)

    def engine_weights(self):
        """(name, tensor) pairs in checkpoint format that make up the policy, as streamed to the engine (LoRA:
        base weights with the adapters' deltas added, adapters/weights.py)."""
        if getattr(self, "unwrapped", (None,))[0] is not self.model:  # unwrap_model reads package metadata: 2 ms
            self.unwrapped = (self.model, self.accelerator.unwrap_model(self.model))
        return policy_weights(self.unwrapped[1], dist(self))

    def trainer_facts(self) -> TrainerFacts:
        """The trainer's side of the static checks: dtypes and the sampler transform its logprobs are taken under
        (temperature in TRL's fused head; everything else in head.py's processed head)."""
        model = self.accelerator.unwrap_model(self.model)
        return TrainerFacts(
            compute_dtype=self.compute_dtype, head_dtype="float32" if self.args.fp32_lm_head else self.compute_dtype,
            fp32_lm_head=self.args.fp32_lm_head, sampler=self.sampler, sampler_unsupported=self.sampler_unsupported,
            sampler_defaults_applied=dict(self.sampler_defaults_applied), dropout=tuple(dropout_sources(model)),
            bit_exact=self.args.bit_exact, attention_dropped=attention_dropped(model))

    def probe_prompts(self) -> list[list[int]]:
        """Token ids of the probe prompts: the first `probe_size` training prompts. With prefix caching on, each
        is lengthened past one KV block so a stale cached block would be reused (and caught)."""
        caching = self.engine.settings.enable_prefix_caching
        return self.gate.policy.default_probe_prompts(self.engine.facts().block_size if caching else None)

    def extra_checks(self, probe) -> list[Check]:
        """Your own gate checks, run with every full gate (before step 0, and every `probe_interval` steps) after the
        built-in ones; a failing Check blocks TIS like any other and its `name` is reported as the cause. `probe`:
        the gate's gate.ProbeResult (prompt and completion ids, trainer logprobs [B, T], counted mask, stats)."""
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
        step = self.state.global_step
        self.failures.append(Failure(step, when, report.to_dict()))
        if self.args.gate == "enforce":
            if self.training_started:  # keep the work done before the fault: checkpoint, then stop
                self._save_checkpoint(self.model, trial=None)
                self.failures[-1].checkpoint = os.path.join(self.args.output_dir, f"checkpoint-{step}")
            self.write_report()
            raise GateFailure(report, when)
        msg = f"trl-correct gate failed {when}; training continues WITHOUT importance-sampling correction.\n{report}"
        if self.args.gate == "warn":
            warnings.warn(msg, stacklevel=2)
            logger.warning(msg)
        else:
            logger.info(msg)

    # -- the gate through training ---------------------------------------------------------------------------------
    def _compute_dtype(self) -> str:
        if self.args.bf16:
            return "bfloat16"
        if self.args.fp16:
            return "float16"
        emb = self.accelerator.unwrap_model(self.model).get_input_embeddings().weight
        return str(emb.dtype).removeprefix("torch.")

    def run_gate(self) -> GateReport:
        """Sync the trainer's weights into the engine, then every check of the start gate (no policy applied);
        `gate.before_training()` returns the probe and floors with the report."""
        return self.full_gate().report

    def full_gate(self) -> GateRun:
        run = self.gate.before_training(self.state.global_step)
        self.engine.gated = True
        return run

    def sync_engine(self) -> Check:
        """Push the trainer's weights into the engine now and verify them (the weight_sync check); TRL's own sync
        (inside generation) then finds the engine current and does nothing."""
        return self.gate.sync(self.state.global_step)

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        """One run per output_dir (checkpoints.py's lock, main process); a resume only from a whole checkpoint (a
        partial one given by path is refused by name; True: the latest whole one)."""
        with checkpoints.run_lock(self.args.output_dir, self.accelerator.is_main_process):
            return self._train(checkpoints.resolve_resume(resume_from_checkpoint, self.args.output_dir), **kwargs)

    def _train(self, resume_from_checkpoint: str | None, **kwargs):
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

    def _generate_and_score_completions(self, inputs):
        step = self.state.global_step
        if self.model.training and not engine_current(self):
            report = self.gate.after_sync(step)
            if not report.passed:
                self.on_gate_failure(report, f"after the weight sync at step {step}")
            elif self.gate.full_check_due(step) and not self.tis_enabled:
                logger.warning("trl-correct gate passes again at step %d: TIS back on", step)
                self.tis_enabled = True
        out = super()._generate_and_score_completions(inputs)
        sampled = self.engine.take_sampled()
        if not self.model.training:
            return out
        v = self.gate.on_batch(out, sampled, step, self.tis_enabled)
        v.drop_unscorable(out)  # never train on a token either side cannot score
        if v.failed:
            self.on_gate_failure(GateReport(tuple(v.failed), v.stats.to_dict()),
                                 f"on the training batch at step {step}")
        out["importance_sampling_ratio"] = v.weights if self.tis_enabled else torch.ones_like(v.weights)
        trl_metrics = metrics(self)["train"]
        passed = bool(self.gate_report and self.gate_report.passed and v.passed)
        record = StepRecord.of(step, v.stats, self.tis_enabled, passed, *(  # TRL's reward and length of this batch
            trl_metrics[k][-1] if trl_metrics.get(k) else None for k in (METRIC_REWARD, METRIC_LENGTH)))
        self.step_records.append(record)
        for name, value in record.metrics_to_log():
            trl_metrics[name].append(value)
        return out

    # -- state -----------------------------------------------------------------------------------------------------
    def gate_state(self, engine: bool = False) -> dict:
        """What a checkpoint keeps of the gate (and, `engine`, the report adds: the engine's facts)."""
        state = {"step": self.state.global_step, "tis_enabled": self.tis_enabled,
                 "gate": self.gate_report.to_dict() if self.gate_report else None, "thresholds": self.gate.thresholds,
                 "calibration": self.gate.calibration.to_dict(), "steps": [r.to_dict() for r in self.step_records],
                 "failures": [f.to_dict() for f in self.failures], "resumes": [r.to_dict() for r in self.resumes]}
        return {**state, "engine": self.engine.facts().to_dict()} if engine else state

    def write_report(self) -> None:
        """<output_dir>/correctness_report.json: the start gate report and every step's metrics."""
        if self.accelerator.is_main_process:
            os.makedirs(self.args.output_dir, exist_ok=True)
            with open(os.path.join(self.args.output_dir, "correctness_report.json"), "w") as f:
                json.dump(self.gate_state(engine=True), f, indent=2, default=str)

    def _save_checkpoint(self, model, trial):
        """TRL's checkpoint, then the gate state, then (every rank done) the marker that makes it a whole one."""
        super()._save_checkpoint(model, trial)
        folder = checkpoint_folder(self, trial)
        if self.accelerator.is_main_process:
            checkpoints.write_json_atomic(os.path.join(folder, STATE_FILE), self.gate_state(), indent=2, default=str)
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            checkpoints.mark_complete(folder, self.state.global_step)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        super().save_model(output_dir, _internal_call=_internal_call)
        certificate.write(self, output_dir or self.args.output_dir)  # every rank: reading sharded weights is collective

    def _restore(self, checkpoint: str) -> None:
        """Load the checkpoint's weights now (so the gate syncs and probes what training resumes from) and its gate
        history. TIS stays off: only the gate that follows can switch it back on. Settings that change what the gate
        compares are re-gated and recorded, not refused (why: checkpoints.settings_changes)."""
        checkpoints.load_weights(self, checkpoint, load_checkpoint_weights)
        changed = checkpoints.settings_changes(checkpoint, self)
        saved = checkpoints.read_state(checkpoint)
        self.step_records = [StepRecord.from_dict(r) for r in saved.get("steps", [])]
        self.failures = [Failure.from_dict(r) for r in saved.get("failures", [])]
        self.resumes = [Resume.from_dict(r) for r in saved.get("resumes", [])]
        self.resumes.append(Resume(checkpoint, saved.get("step"), (saved.get("gate") or {}).get("verdict"),
                                   saved.get("tis_enabled"), changed or None))
        self.tis_enabled = False
