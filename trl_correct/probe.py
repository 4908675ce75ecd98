"""The trainer side of the gate: the probe (the engine samples, the trainer scores the same token ids through TRL's
own path), scoring at another temperature, and the full gate run (static checks, weight fingerprint, probe, the
audits of audit.py, a subclass's extra checks), with one verdict for all ranks.

A mixin of CorrectGRPOTrainer (trainer.py), split out to keep each file readable; it uses the trainer's engine, args,
sampler and TRL's scoring method, and overrides no GRPOTrainer method. Deciding is gate.py's.
"""

from contextlib import contextmanager
from dataclasses import replace

import torch
from accelerate.utils import gather_object
from trl.trainer.utils import add_fused_lm_head, pad

from .audit import (AUDIT_SCALES, generated_rows, loss_audit, padded_batch, quiet_trackers, self_consistency,
                    token_identity)
from .gate import (LINEAR_LOSS_TYPES, Check, GateReport, clip_check, loss_audit_check, mismatch_check, non_finite_check,
                   reset_check, self_consistency_check, static_checks, support_check, temperature_check,
                   token_identity_check)
from .head import add_processed_head
from .numerics import per_token, ratio_stats, sequence_gaps, summarize_gaps, valid_gaps, weight_stats
from .sampler import OUTSIDE_LOGPROB
from .weights import scoring_model

PROBE_SEED = 1234
# Cached-prefix probe this many times worse than the uncached one = stale cache. Clean bf16 CPU runs measured the two
# within 10 % (0.0067 vs 0.0072); a cache left stale across a 0.1-std weight move measured 4.7x (0.033 vs 0.007).
STALE_FACTOR = 2.0
# Second temperature of the temperature check when the config's is 1 (at T=1 a temperature applied twice or never
# changes nothing, so the fault can only show away from it).
ALT_TEMPERATURE = 0.7


class GateRunner:
    """Probe and full-gate methods of CorrectGRPOTrainer (see module docstring)."""

    def probe(self, prompt_ids: list[list[int]] | None = None, temperature: float | None = None) -> dict:
        """Engine samples from the probe prompts; the trainer scores the same tokens (both at `temperature`, default
        the config's). Returns mismatch stats, ratio diagnostics and clip_frac of the weights TIS would apply."""
        prompt_ids = self.probe_prompts() if prompt_ids is None else prompt_ids
        t = self.temperature if temperature is None else temperature
        completion_ids, engine_lps = self.engine.sample(prompt_ids, max_tokens=self.args.probe_tokens,
                                                        seed=PROBE_SEED + self.args.seed, temperature=t)
        with self.at_temperature(t):
            trainer_lps, mask = self.score(prompt_ids, completion_ids)
        engine_lps = pad([torch.tensor(x, dtype=torch.float32) for x in engine_lps], padding_value=float("nan"),
                         padding_side="right").to(trainer_lps.device)
        outside = outside_support(trainer_lps, mask)
        counted = mask.bool() & ~outside
        r, nonfinite = valid_gaps(trainer_lps, engine_lps, counted)
        self.last_probe_gaps = r.abs().float().cpu()  # the |Δlogp| distribution, for the doctor's plot
        self.last_probe_batch = (prompt_ids, completion_ids, trainer_lps, counted)
        w, hit = self.correction(trainer_lps, engine_lps, counted)
        w_tok = per_token(w, counted)
        stats = dict(summarize_gaps(r, nonfinite), n_outside_support=int(outside.sum()))
        stats.update(weight_stats(w_tok, hit[counted]))
        stats.update(ratio_stats(r, sequence_gaps(trainer_lps, engine_lps, counted), w_tok))
        return stats

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
        add_fused_lm_head(model, temperature=t, cast_lm_head_to_fp32=self.args.cast_lm_head_to_fp32,
                          outputs=("log_probs", "entropy"))
        if self.sampler.transforms and not self.sampler_unreproducible:
            add_processed_head(model, self.sampler, fp32_head=self.args.cast_lm_head_to_fp32)
        try:
            yield
        finally:
            model.forward, self.temperature, self.sampler = saved

    @torch.no_grad()
    def score(self, prompt_ids: list[list[int]], completion_ids: list[list[int]]):
        """Trainer logprobs of `completion_ids` after `prompt_ids`, through TRL's own scoring path.
        Returns (trainer_logprobs [B, T], mask [B, T])."""
        b = padded_batch(prompt_ids, completion_ids, self._tokenizer.pad_token_id, self.accelerator.device)
        ids = torch.cat([b["prompt_ids"], b["completion_ids"]], 1)
        attn = torch.cat([b["prompt_mask"], b["completion_mask"]], 1)
        lps, _, _ = self._get_per_token_logps_and_entropies(self.model, ids, attn, b["completion_ids"].size(1),
                                                            batch_size=self.args.per_device_train_batch_size)
        return lps.float(), b["completion_mask"]

    def _probe_checks(self) -> tuple[list[Check], dict]:
        """The probe's mismatch check; with prefix caching on, the probe is re-measured on prompts whose prefix cannot
        be cached (first token changed): scoring clearly better there names the stale cache as the cause."""
        prompts = self.probe_prompts()
        stats = self.probe(prompts)
        gaps = self.last_probe_gaps
        check = mismatch_check(stats, self.thresholds)
        checks = [check, non_finite_check(stats["n_nonfinite"]), clip_check(stats["clip_frac"],
                                                                            self.args.max_clip_frac)]
        checks += [support_check(stats["n_outside_support"], "probe")] if stats["n_outside_support"] else []
        probe_batch = self.last_probe_batch
        if self.engine.settings.enable_prefix_caching:
            # Differential: the same prompts with the first token changed cannot hit any cached block. A stale
            # cache shows as cached prompts scoring clearly worse than uncached ones (or failing while they pass).
            vocab = self.accelerator.unwrap_model(self.model).config.vocab_size
            self._fresh_shift = self._fresh_shift % (vocab - 1) + 1  # a new first token each time: never cached
            fresh = self.probe([[(p[0] + self._fresh_shift) % vocab] + p[1:] for p in prompts])
            cached_mean, fresh_mean = stats["mean_abs_logprob_diff"], fresh["mean_abs_logprob_diff"]
            worse = (cached_mean > STALE_FACTOR * fresh_mean
                     and cached_mean - fresh_mean > self.thresholds["mean_abs_logprob_diff"] / 10)
            if worse or (not check.passed and mismatch_check(fresh, self.thresholds).passed):
                checks.append(Check(
                    "prefix_cache", False,
                    f"probe on cached prefixes: mean |Δ|={cached_mean:.3g}, max={stats['max_abs_logprob_diff']:.3g}; "
                    f"on uncached ones: mean {fresh_mean:.3g}, max {fresh['max_abs_logprob_diff']:.3g}: KV blocks "
                    "computed with old weights were reused after the sync",
                    "set enable_prefix_caching: false (or make sure reset_prefix_cache() runs after every weight "
                    "load)"))
        self.last_probe_gaps, self.last_probe_batch = gaps, probe_batch
        return checks, stats

    def _audit_checks(self, stats: dict, engine_ignores_t: bool = False) -> list[Check]:
        """The full gate's checks beyond the probe: temperature applied once (a second probe, at T=1 or away from
        it), trainer self-consistency and the loss audit (both on the probe's completions). `stats`: the probe's."""
        prompts, completions, trainer_lps, mask = self.last_probe_batch
        gaps = self.last_probe_gaps
        if self.temperature == 1.0:
            t, at_one, at_t = ALT_TEMPERATURE, stats, self.probe(prompts, temperature=ALT_TEMPERATURE)
        else:
            t, at_one, at_t = self.temperature, self.probe(prompts, temperature=1.0), stats
        self.last_probe_gaps, self.last_probe_batch = gaps, (prompts, completions, trainer_lps, mask)
        consistency = self_consistency(self, prompts, completions, trainer_lps, mask)
        self.last_self_consistency = consistency
        losses, grads = loss_audit(self, prompts, completions, trainer_lps)
        rows, sampled = generated_rows(self)  # whole completions, as generated: no EOS masking yet
        return [self._identity_check(rows, sampled, "generation through TRL's _generate"),
                temperature_check(at_one, at_t, t, self.thresholds, engine_ignores_t),
                self_consistency_check(consistency, self.thresholds["max_abs_logprob_diff"] / 2),
                loss_audit_check(losses, grads, scales=AUDIT_SCALES,
                                 linear=self.loss_type in LINEAR_LOSS_TYPES)]

    def _identity_check(self, rows, sampled: dict, label: str, eos_ids=()) -> Check:
        """token_identity over this rank's rows, counted over all ranks (audit.token_identity for the arguments)."""
        n_bad, example = token_identity(rows, sampled, eos_ids)
        n_rows, n_bad = (int(x) for x in self.accelerator.gather(
            torch.tensor([[len(rows), n_bad]], device=self.accelerator.device)).sum(0))
        return token_identity_check(n_rows, n_bad, example, label)

    def run_gate(self) -> GateReport:
        """Sync the trainer's weights into the engine, then run every check. Does not apply the policy."""
        with quiet_trackers(self):
            return self._run_gate()

    def _run_gate(self) -> GateReport:
        self.engine.sync_weights()
        self._last_loaded_step = self.state.global_step
        checks = static_checks(self.trainer_facts(), self.engine.facts())
        if self.engine.settings.enable_prefix_caching:
            checks.append(reset_check(self.engine.last_reset_ok))
        if self.args.verify_weight_sync:
            checks.append(self._last_sync_check)
        probe_checks, stats = self._probe_checks()
        raw = not next(c for c in checks if c.name == "logprobs_mode").passed
        probe_checks += self._audit_checks(stats, engine_ignores_t=raw) + list(self.extra_checks())
        report = GateReport(tuple(checks + probe_checks), dict(stats, thresholds=self.thresholds,
                                                               thresholds_reason=self.thresholds_reason))
        return self._merge(report)

    def _merge(self, report: GateReport) -> GateReport:
        """One verdict for all ranks: the first failing rank's report, else this rank's."""
        if self.accelerator.num_processes == 1:
            return report
        reports = gather_object([report])
        return next((r for r in reports if not r.passed), report)


def outside_support(trainer_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: counted tokens the trainer scores as outside its kept set (head.py marks them OUTSIDE_LOGPROB)."""
    return mask.bool() & (trainer_logprobs <= OUTSIDE_LOGPROB / 2)
