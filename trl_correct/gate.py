"""The trainer side of the gate: the probe (the engine samples, the trainer scores the same token ids through TRL's
own path), the noise floors the thresholds are calibrated from, and the assembly of every check by `SCHEDULE`.

A mixin of CorrectGRPOTrainer (trainer.py), split out to keep each file readable; it uses the trainer's engine, args,
sampler and TRL's scoring method, and overrides no GRPOTrainer method. Deciding is gate.py's; thresholds are
calibrate.py's; measuring is numerics.py's.
"""

from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch
from accelerate.utils import gather_object

from .adapters.audit import (AUDIT_SCALES, generated_rows, loss_audit, padded_batch, quiet_trackers, self_consistency,
                    token_identity)
from .core.calibrate import CAPS, Calibration, calibrate
from .core.checks import (BLOCKING, LINEAR_LOSS_TYPES, Check, GateReport, clip_check, loss_audit_check, mismatch_check,
                   non_finite_check, reset_check, self_consistency_check, stale_cache_check, static_checks,
                   support_check, temperature_check, token_identity_check)
from .adapters.head import add_processed_head
from .core.numerics import measure, summarize_gaps, valid_gaps
from .adapters.trl_api import add_fused_lm_head, pad, pad_token_id, score
from .adapters.weights import scoring_model

PROBE_SEED = 1234
# Cached-prefix probe this many times worse than the uncached one = stale cache. Clean bf16 CPU runs measured the two
# within 10 % (0.0067 vs 0.0072); a cache left stale across a 0.1-std weight move measured 4.7x (0.033 vs 0.007).
STALE_FACTOR = 2.0
# ...and worse by at least this share of the mean threshold (two near-zero fp32 figures can differ 2x by chance).
STALE_MIN_SHARE = 0.1
# Second temperature of the temperature check when the config's is 1 (at T=1 a temperature applied twice or never
# changes nothing, so the fault can only show away from it).
ALT_TEMPERATURE = 0.7
# Probe prompts are lengthened to one KV block plus this many tokens when prefix caching is on, so that each holds at
# least one full block a stale cache could serve (vLLM caches full blocks only).
PAST_BLOCK_TOKENS = 16

# When each group of checks runs (the data the gate is assembled from):
#   start    the full gate before step 0 (and after a resume), and `run_gate()`
#   interval every `probe_interval` optimizer steps, after that step's weight sync
#   sync     after every other weight sync in training (`sync+caching`: only when prefix caching is on)
#   batch    every training batch (trainer.py: mismatch, clip share, support, non-finite, token identity)
SCHEDULE = {
    "static": ("start", "interval"),  # gate.STATIC_CHECKS on both sides' facts
    "weight_sync": ("start", "interval", "sync"),  # the engine's fingerprint after the load
    "prefix_cache_reset": ("start", "interval", "sync"),  # vLLM's answer to the reset (prefix caching on only)
    "probe": ("start", "interval", "sync+caching"),  # probe mismatch, non-finite, clip share, cache differential
    "calibration": ("start", "interval"),  # floors on the trainer alone -> thresholds; trainer_consistency
    "audits": ("start",),  # dry batch token identity, temperature, loss audit
    "extra": ("start", "interval"),  # a subclass's extra_checks(probe)
}


def due(group: str, when: str, caching: bool) -> bool:
    runs = SCHEDULE[group]
    return when in runs or (caching and when == "sync" and "sync+caching" in runs)


@contextmanager
def _set_for_a_while(obj, name: str, value):
    """`obj.name = value` inside the block, the old value restored after it (whatever happens inside)."""
    saved = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, saved)


@dataclass(frozen=True)
class ProbeResult:
    """One probe: the engine sampled `completion_ids` after `prompt_ids` at `temperature`, the trainer scored them."""

    prompt_ids: list
    completion_ids: list
    trainer_logprobs: torch.Tensor  # [B, T]
    engine_logprobs: torch.Tensor  # [B, T] (NaN past each completion's end)
    mask: torch.Tensor  # [B, T] bool: the tokens counted (finite on both sides, inside the trainer's kept set)
    stats: dict  # numerics.measure's statistics
    gaps: torch.Tensor = field(repr=False)  # |Δlogp| of each counted token (the doctor's plot)
    temperature: float = 1.0


@dataclass(frozen=True)
class GateRun:
    """A gate run with what it measured: the report, the probe it rests on and the floors it calibrated from."""

    report: GateReport
    probe: ProbeResult | None
    floors: dict


class GateRunner:
    """Probe and full-gate methods of CorrectGRPOTrainer (see module docstring)."""

    def probe(self, prompt_ids: list[list[int]] | None = None, temperature: float | None = None) -> ProbeResult:
        """Engine samples from the probe prompts; the trainer scores the same tokens (both at `temperature`, default
        the config's)."""
        prompt_ids = self.probe_prompts() if prompt_ids is None else prompt_ids
        t = self.temperature if temperature is None else temperature
        completion_ids, engine_lps = self.engine.sample(prompt_ids, max_tokens=self.args.probe_tokens,
                                                        seed=PROBE_SEED + self.args.seed, temperature=t)
        with self.at_temperature(t):
            trainer_lps, mask = self.score(prompt_ids, completion_ids)
        engine_lps = pad([torch.tensor(x, dtype=torch.float32) for x in engine_lps], padding_value=float("nan"),
                         padding_side="right").to(trainer_lps.device)
        m = measure(trainer_lps, engine_lps, mask, self.correction)
        return ProbeResult(prompt_ids, completion_ids, trainer_lps, engine_lps, m.keep, m.stats, m.gaps, t)

    @contextmanager
    def at_temperature(self, t: float):
        """Score at temperature `t` through the same path as always: TRL's fused head (and the processed head when
        the sampler does more) re-installed at `t` for the duration, then the trainer's own head back."""
        if t == self.temperature:
            yield
            return
        model = scoring_model(self.accelerator.unwrap_model(self.model))
        saved = (model.forward, self.temperature, self.sampler)
        self.temperature, self.sampler = t, replace(self.sampler, temperature=t)
        add_fused_lm_head(model, temperature=t, cast_lm_head_to_fp32=self.args.fp32_lm_head,
                          outputs=("log_probs", "entropy"))
        if self.sampler.transforms and not self.sampler_unsupported:
            add_processed_head(model, self.sampler, fp32_lm_head=self.args.fp32_lm_head)
        try:
            yield
        finally:
            model.forward, self.temperature, self.sampler = saved

    @torch.no_grad()
    def score(self, prompt_ids: list[list[int]], completion_ids: list[list[int]]):
        """Trainer logprobs of `completion_ids` after `prompt_ids`, through TRL's own scoring path.
        Returns (trainer_logprobs [B, T], mask [B, T])."""
        b = padded_batch(prompt_ids, completion_ids, pad_token_id(self), self.accelerator.device)
        ids = torch.cat([b["prompt_ids"], b["completion_ids"]], 1)
        attn = torch.cat([b["prompt_mask"], b["completion_mask"]], 1)
        lps, _, _ = score(self, ids, attn, b["completion_ids"].size(1), self.args.per_device_train_batch_size)
        return lps.float(), b["completion_mask"]

    # -- floors and calibration ------------------------------------------------------------------------------------
    def without_autocast(self):
        """TRL's scoring with accelerate's autocast off: the fp32 reference of a bf16/fp16 trainer with fp32
        weights."""
        return _set_for_a_while(self.accelerator, "native_amp", False)

    def measure_floors(self, probe: ProbeResult) -> dict:
        """The noise floors of calibrate.py, on the probe's tokens and the trainer alone: its batch scored whole vs
        one sequence at a time, and (bf16/fp16 with fp32 weights) under autocast vs in fp32. A floor that cannot be
        measured here is a string saying why. Taken over all ranks (the maximum), so every rank decides alike."""
        floors = {"trainer_vs_itself": self_consistency(self, probe.prompt_ids, probe.completion_ids,
                                                        probe.trainer_logprobs, probe.mask)}
        weights = {p.dtype for p in self.accelerator.unwrap_model(self.model).parameters()}
        if self.compute_dtype == "float32":
            floors["dtype_rounding"] = "the trainer computes in float32: no wider reference without a copy"
        elif weights != {torch.float32} or not self.accelerator.native_amp:
            floors["dtype_rounding"] = (f"the trainer's weights are {sorted(str(w) for w in weights)} without "
                                        "autocast: no fp32 reference without a copy")
        else:
            with self.without_autocast():
                reference, _ = self.score(probe.prompt_ids, probe.completion_ids)
            floors["dtype_rounding"] = summarize_gaps(*valid_gaps(probe.trainer_logprobs, reference, probe.mask))
        return self._max_over_ranks(floors)

    def engine_floor(self, probe: ProbeResult) -> dict:
        """The engine against itself across batch compositions: each probe prompt sampled alone with the probe's
        seed, its logprobs compared with the batched probe's on the tokens both runs sampled alike (the doctor's
        --calibrate; the gate does not use it, so that a broken engine never loosens its own thresholds)."""
        gaps = []
        for i, (prompt, completion) in enumerate(zip(probe.prompt_ids, probe.completion_ids)):
            ids, lps = self.engine.sample([prompt], max_tokens=self.args.probe_tokens,
                                          seed=PROBE_SEED + self.args.seed, temperature=probe.temperature)
            same = next((j for j, (x, y) in enumerate(zip(completion, ids[0])) if x != y),
                        min(len(completion), len(ids[0])))
            gaps.append(torch.tensor(lps[0][:same], dtype=torch.float64)
                        - probe.engine_logprobs[i, :same].double().cpu())
        r = torch.cat(gaps) if gaps else torch.zeros(0, dtype=torch.float64)
        finite = torch.isfinite(r)
        return summarize_gaps(r[finite], int((~finite).sum()))

    def _max_over_ranks(self, floors: dict) -> dict:
        if self.accelerator.num_processes == 1:
            return floors
        merged = {}
        for rank_floors in gather_object([floors]):
            for name, f in rank_floors.items():
                old = merged.get(name)
                if not isinstance(f, dict) or not isinstance(old, dict):
                    merged[name] = f if old is None or isinstance(f, dict) else old
                else:
                    merged[name] = {k: (old[k] + f[k] if k in ("n_tokens", "n_nonfinite") else max(old[k], f[k]))
                                    if isinstance(f.get(k), (int, float)) else f[k] for k in f}
        return merged

    def calibrate(self, floors: dict) -> Calibration:
        """Set the thresholds from `floors` (calibrate.py's rule; the config's own thresholds win) and return them."""
        a = self.args
        self.calibration = calibrate(floors if a.calibrate else {}, self.compute_dtype, self.on_gpu,
                                     user=a.user_thresholds(), bit_exact=a.bit_exact)
        self.thresholds = self.calibration.values()
        return self.calibration

    # -- checks ----------------------------------------------------------------------------------------------------
    def _probe_checks(self, probe: ProbeResult) -> list[Check]:
        """The probe's mismatch, non-finite and clip checks; with prefix caching on, the probe is re-measured on
        prompts whose prefix cannot be cached (first token changed): scoring clearly better there names the stale
        cache as the cause."""
        stats = probe.stats
        check = mismatch_check(stats, self.thresholds)
        checks = [check, non_finite_check(stats["n_nonfinite"]), clip_check(stats["clip_frac"],
                                                                            self.args.max_clip_frac)]
        checks += [support_check(stats["n_outside_support"], "probe")] if stats["n_outside_support"] else []
        if self.engine.settings.enable_prefix_caching:
            vocab = self.accelerator.unwrap_model(self.model).config.vocab_size
            self._fresh_shift = self._fresh_shift % (vocab - 1) + 1  # a new first token each time: never cached
            fresh = self.probe([[(p[0] + self._fresh_shift) % vocab] + p[1:] for p in probe.prompt_ids]).stats
            cached_mean, fresh_mean = stats["mean_abs_logprob_diff"], fresh["mean_abs_logprob_diff"]
            worse = (cached_mean > STALE_FACTOR * fresh_mean
                     and cached_mean - fresh_mean > STALE_MIN_SHARE * self.thresholds["mean_abs_logprob_diff"])
            if worse or (not check.passed and mismatch_check(fresh, self.thresholds).passed):
                checks.append(stale_cache_check(stats, fresh, STALE_FACTOR))
        return checks

    def _audit_checks(self, probe: ProbeResult, engine_ignores_t: bool) -> list[Check]:
        """The start gate's checks beyond the probe: a dry batch through TRL's `_generate` (token identity), the
        temperature applied once (a second probe, at T=1 or away from it) and the loss audit."""
        if self.temperature == 1.0:
            t, at_one, at_t = ALT_TEMPERATURE, probe.stats, self.probe(probe.prompt_ids, ALT_TEMPERATURE).stats
        else:
            t, at_one, at_t = self.temperature, self.probe(probe.prompt_ids, 1.0).stats, probe.stats
        losses, grads = loss_audit(self, probe.prompt_ids, probe.completion_ids, probe.trainer_logprobs)
        rows, sampled = generated_rows(self)  # whole completions, as generated: no EOS masking yet
        return [self._identity_check(rows, sampled, "generation through TRL's _generate"),
                temperature_check(at_one, at_t, t, self.thresholds, engine_ignores_t),
                loss_audit_check(losses, grads, scales=AUDIT_SCALES, linear=self.loss_type in LINEAR_LOSS_TYPES)]

    def _identity_check(self, rows, sampled: dict, label: str, eos_ids=()) -> Check:
        """token_identity over this rank's rows, counted over all ranks (audit.token_identity for the arguments)."""
        n_bad, example = token_identity(rows, sampled, eos_ids)
        n_rows, n_bad = (int(x) for x in self.accelerator.gather(
            torch.tensor([[len(rows), n_bad]], device=self.accelerator.device)).sum(0))
        return token_identity_check(n_rows, n_bad, example, label)

    def gate_checks(self, when: str) -> GateRun:
        """Every check `SCHEDULE` lists for `when` (start / interval / sync), on the engine as it is now (the caller
        has synced it). Does not apply the policy."""
        caching = self.engine.settings.enable_prefix_caching
        checks, probe, floors = [], None, {}
        facts = (self.trainer_facts(), self.engine.facts()) if due("static", when, caching) else None
        if facts:
            checks += static_checks(*facts)
        if due("prefix_cache_reset", when, caching) and caching:
            checks.append(reset_check(self.engine.last_reset_ok))
        if due("weight_sync", when, caching) and self.args.verify_weight_sync:
            checks.append(self.last_sync_check)
        blocked = [c.name for c in checks if not c.passed and c.name in BLOCKING]
        if self.accelerator.num_processes > 1:  # every rank probes or none does: the probe has collectives (a TP
            blocked = sorted({b for r in gather_object([blocked]) for b in r})  # engine, the floors' max over ranks)
        if due("probe", when, caching) and not blocked:
            probe = self.probe()
            consistency = None
            if due("calibration", when, caching):
                floors = self.measure_floors(probe)
                self.calibrate(floors)
                consistency = self_consistency_check(floors["trainer_vs_itself"], CAPS[self.calibration.dtype])
            checks += self._probe_checks(probe)
            if due("audits", when, caching):
                raw = facts is not None and not next(c for c in checks if c.name == "logprobs_mode").passed
                audits = self._audit_checks(probe, engine_ignores_t=raw)
                checks += audits[:2] + ([consistency] if consistency else []) + audits[2:]
            elif consistency:
                checks.append(consistency)
            if due("extra", when, caching):
                checks += list(self.extra_checks(probe))
        mismatch = dict(probe.stats, thresholds=self.thresholds) if probe else {}
        report = GateReport(tuple(checks), mismatch, self.calibration.to_dict() if floors else None)
        return GateRun(self._merge(report), probe, floors)

    def run_gate(self) -> GateReport:
        """Sync the trainer's weights into the engine, then run every check of the start gate. Does not apply the
        policy. `full_gate()` returns the probe and floors with the report."""
        return self.full_gate().report

    def full_gate(self) -> GateRun:
        with quiet_trackers(self), self.gate_phase():
            self.sync_engine()
            return self.gate_checks("start")

    def gate_phase(self):
        """`in_gate` is true while a gate runs its own probes and audits (TRL's loss and generation included)."""
        return _set_for_a_while(self, "in_gate", True)

    def _merge(self, report: GateReport) -> GateReport:
        """One verdict for all ranks: the first failing rank's report, else this rank's."""
        if self.accelerator.num_processes == 1:
            return report
        reports = gather_object([report])
        return next((r for r in reports if not r.passed), report)
