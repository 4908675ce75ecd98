"""The correctness gate as data: named checks, each with pass/fail, what was measured, the threshold and the fix.

Deciding is a pure function of facts (facts.py: what each side runs with) and measurements (numerics.py) gathered
elsewhere; thresholds come from calibrate.py. Nothing here imports vLLM or TRL, so every check is tested on hand-made
facts. A failed check's `name` is the *cause* reported everywhere (logs, exceptions, correctness_report.json).

Static checks (one function each, `STATIC_CHECKS`): architecture (only for a model vLLM serves through its
Transformers backend), logprobs_mode, dtype, lm_head_dtype, attention (only for a model with attention soft-capping),
sampler, generation_config, prefix_cache, dropout,
bit_exact, async_scheduling. Checks of measurements: weight_sync, prefix_cache_reset, mismatch, sampler_support,
non_finite_logprobs, ratio_clipped, correction_not_applied, temperature, token_mismatch, trainer_consistency (and
prefix_cache again, from the probe's cached/uncached differential, in probe.py), routing (mixture-of-experts models).
Where a new check goes: docs/ARCHITECTURE.md.
"""

import math
from dataclasses import asdict, dataclass, field

from .calibrate import FLOOR_NAMES
from .facts import EngineFacts, TrainerFacts
from .numerics import within
from .sampler import SAMPLER_FIELDS, is_off, normalized


@dataclass(frozen=True)
class Check:
    """One named check. `measured` / `threshold`: the figure(s) compared (a number, or {statistic: number}), kept as
    data so the table, the report and a test read the same values; None for checks of facts."""

    name: str
    passed: bool
    detail: str
    fix: str = ""
    measured: float | dict | None = None
    threshold: float | dict | None = None

    def limits(self) -> str:
        """The threshold in words, for the table ('' when the check has none)."""
        if self.threshold is None or (not isinstance(self.threshold, dict) and self.threshold == 0):
            return ""  # none, or a count that must be 0 (the detail says so)
        if isinstance(self.threshold, dict):
            return ", ".join(f"{SHORT.get(k, k)} {v:.3g}" for k, v in self.threshold.items())
        return f"{self.threshold:.3g}"


SHORT = {"mean_abs_logprob_diff": "mean", "p99_abs_logprob_diff": "p99", "max_abs_logprob_diff": "max",
         "kl_k3": "k3"}


@dataclass(frozen=True)
class GateReport:
    checks: tuple[Check, ...]
    mismatch: dict = field(default_factory=dict)  # the probe's (or batch's) statistics
    calibration: dict | None = None  # calibrate.Calibration.to_dict(): thresholds, their floors and rule

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def causes(self) -> list[str]:
        return [c.name for c in self.checks if not c.passed]

    def check(self, name: str) -> Check | None:
        return next((c for c in self.checks if c.name == name), None)

    def to_dict(self) -> dict:
        return {"verdict": "pass" if self.passed else "fail", "causes": self.causes,
                "checks": [asdict(c) for c in self.checks], "mismatch": dict(self.mismatch),
                "calibration": self.calibration}

    def table(self) -> str:
        width = max((len(c.name) for c in self.checks), default=4)
        lines = [f"correctness gate: {'PASS' if self.passed else 'FAIL: ' + ', '.join(self.causes)}"]
        for c in self.checks:
            limits = c.limits()
            lines.append(f"  {'ok  ' if c.passed else 'FAIL'} {c.name:<{width}}  {c.detail}"
                         + (f" [limits: {limits}]" if limits else ""))
            if not c.passed and c.fix:
                lines.append(f"       {'':<{width}}  fix: {c.fix}")
        if self.calibration:
            lines.append(f"  thresholds ({self.calibration['summary']}):")
            lines += [f"       {SHORT.get(k, k):<5} {t['value']:<9.3g} {t['source']:<10} {t['rule']}"
                      for k, t in self.calibration["thresholds"].items()]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


class GateFailure(RuntimeError):
    """Raised under gate='enforce' when the gate fails; carries the report."""

    def __init__(self, report: GateReport, when: str = "before training"):
        self.report = report
        super().__init__(f"trl-correct gate failed {when} (causes: {', '.join(report.causes)})\n{report.table()}")


# -- static checks: one function each, (TrainerFacts, EngineFacts) -> Check, or None where it does not apply --------

def check_architecture(t: TrainerFacts, e: EngineFacts) -> Check | None:
    """A model vLLM has no native implementation for: vLLM's Transformers backend patches the transformers class the
    trainer runs too, so the trainer's forward works only while the engine keeps its instances off vLLM's compile
    path (engine.py). None for a natively implemented architecture."""
    tb = e.transformers_backend
    if tb is None:
        return None
    served = (f"vLLM serves {tb.architecture} through its Transformers backend ({tb.vllm_class}; no native "
              "implementation)")
    patched = f"transformers' {', '.join(tb.patched)}" if tb.patched else ""
    if tb.unsupported:
        return Check("architecture", False, f"{served}; its compile decorator patched {patched or 'no class'}, "
                                            f"which the trainer runs too: {tb.unsupported}",
                     "use an architecture vLLM implements natively, or a vLLM release whose compile decorator "
                     "trl-correct has read (engine.VERIFIED_COMPILE_DECORATOR)")
    return Check("architecture", True, served + (f"; its compile decorator patched {patched} (the trainer's class "
                                                 "too): instances vLLM did not build run their own forward"
                                                 if patched else ""))


def check_logprobs_mode(t: TrainerFacts, e: EngineFacts) -> Check:
    temp, transforms = e.sampler.temperature, e.sampler.transforms
    if e.logprobs_mode == "processed_logprobs":
        return Check("logprobs_mode", True, "engine returns processed_logprobs (after temperature etc.)")
    if e.logprobs_mode == "raw_logprobs" and is_off("temperature", temp) and not transforms:
        return Check("logprobs_mode", True, "engine returns raw_logprobs; equal to processed at T=1 with no other "
                                            "sampler transform")
    return Check("logprobs_mode", False, f"engine returns {e.logprobs_mode} at temperature={temp:g}"
                 + (f" with {', '.join(transforms)}" if transforms else "")
                 + ": they ignore the sampler, so ratios compare different distributions",
                 "set logprobs_mode: processed_logprobs")


def check_attention(t: TrainerFacts, e: EngineFacts) -> Check | None:
    """The trainer's attention implementation computes what the model's config asks (vLLM always does): transformers'
    sdpa attention ignores attention soft-capping, which only its eager path applies (Gemma 2). None when the model
    has nothing an implementation could leave out."""
    if not t.attention_dropped:
        return None
    return Check("attention", False, f"the trainer's attention leaves out what vLLM applies: {t.attention_dropped}",
                 "load the policy with eager attention (model_init_kwargs: {attn_implementation: eager}; trl-correct "
                 "does so when attn_implementation is not set)")


def check_dtype(t: TrainerFacts, e: EngineFacts) -> Check:
    same = t.compute_dtype == e.compute_dtype
    return Check("dtype", same, f"trainer computes in {t.compute_dtype}, engine in {e.compute_dtype}",
                 "" if same else "set the engine dtype to the trainer's (vllm_dtype: auto follows the trainer) or "
                                 "train in the engine's dtype (bf16: true / false)")


def check_lm_head_dtype(t: TrainerFacts, e: EngineFacts) -> Check:
    if t.fp32_lm_head and not e.head_dtype_supported:
        return Check("lm_head_dtype", False, f"fp32_lm_head requested but the installed vLLM cannot run an fp32 head "
                                             f"(engine head in {e.head_dtype}, trainer head in {t.head_dtype})",
                     "install a vLLM with hf_overrides head_dtype (>= 0.26), or set fp32_lm_head: false")
    ok = t.head_dtype == e.head_dtype and (not t.fp32_lm_head or t.head_dtype == "float32")
    return Check("lm_head_dtype", ok, f"lm_head computes in {t.head_dtype} (trainer) and {e.head_dtype} (engine)",
                 "" if ok else "set fp32_lm_head: true so both sides run the head in float32")


def check_sampler(t: TrainerFacts, e: EngineFacts) -> Check:
    ts, es = t.sampler.settings(), e.sampler.settings()
    diffs = [f"{f}: trainer {ts[f]} vs engine {es[f]}" for f in SAMPLER_FIELDS
             if normalized(f, ts[f]) != normalized(f, es[f])]
    fix = (f"set sampler settings once, as config fields ({', '.join(SAMPLER_FIELDS)}), never in generation_kwargs "
           "or on one side only")
    if e.unreproduced:
        diffs.append(f"engine applies {sorted(e.unreproduced)} (generation_kwargs), which the trainer does not "
                     "reproduce")
        fix = "remove " + ", ".join(sorted(e.unreproduced)) + " from generation_kwargs"
    if t.sampler_unsupported:
        diffs.append(f"trainer cannot reproduce the transform: {t.sampler_unsupported}")
        fix = "use a sampler with temperature only for this model (top_k 0, top_p 1, min_p 0, no penalties)"
    if list(t.sampler.order) != list(e.sampler.order):
        diffs.append(f"engine applies {list(e.sampler.order)}, trainer reproduces {list(t.sampler.order)}")
        fix = "use a vLLM whose sampler order trl-correct knows (engine.VERIFIED_VLLM)"
    transforms = e.sampler.transforms
    return Check("sampler", not diffs, "; ".join(diffs) if diffs else
                 f"both sides sample/score at temperature={e.sampler.temperature:g}"
                 + (f" with {', '.join(transforms)} (trainer reproduces the engine's transform)" if transforms
                    else ", no other transform"), fix if diffs else "")


def check_generation_config(t: TrainerFacts, e: EngineFacts) -> Check:
    es = e.sampler.settings()
    applied = t.sampler_defaults_applied
    wrong = {k: es[k] for k, v in applied.items() if normalized(k, v) != normalized(k, es[k])}
    ignored = {k: v for k, v in e.generation_config.items()
               if k in SAMPLER_FIELDS and k not in applied and normalized(k, v) != normalized(k, es[k])}
    parts = [f"model generation_config defaults in effect on both sides: {applied}"] if applied else []
    if ignored:
        parts.append("model generation_config defaults not in effect on either side (the config's values are used "
                     f"on both): {ignored}")
    detail = "; ".join(parts) or "model generation_config sets no sampler default that differs from the config"
    if wrong:
        detail = f"model generation_config defaults {applied} applied by the trainer, engine uses {wrong}"
    return Check("generation_config", not wrong, detail,
                 "build the engine from the trainer's sampler (engine_settings)" if wrong else "")


def check_prefix_cache(t: TrainerFacts, e: EngineFacts) -> Check:
    if not e.prefix_caching:
        return Check("prefix_cache", True, "prefix caching off")
    ok = e.reset_after_sync
    return Check("prefix_cache", ok, "prefix caching on, " + (
        "cache reset after every weight sync" if ok else "cache NOT reset after weight sync: KV blocks computed with "
                                                         "old weights are reused"),
                 "" if ok else "set enable_prefix_caching: false")


def check_dropout(t: TrainerFacts, e: EngineFacts) -> Check:
    if not t.dropout:
        return Check("dropout", True, "no dropout in the trainer's forward")
    return Check("dropout", False, "the trainer's forward draws dropout while training: " + "; ".join(t.dropout)
                 + " (its logprobs are random draws; the engine has no dropout)",
                 "set the dropout rates to 0 (lora_dropout: 0; the model config's attention/hidden dropout)")


def check_bit_exact(t: TrainerFacts, e: EngineFacts) -> Check | None:
    """bit_exact requested: vLLM's batch-invariant mode must be possible here and on (colocated, the engine's aten
    overrides are the trainer's too); the probe and every batch then have to match exactly (thresholds 0)."""
    if not t.bit_exact:
        return None
    if e.batch_invariant_unsupported:
        return Check("bit_exact", False, f"bit_exact requested: {e.batch_invariant_unsupported}",
                     "set bit_exact: false (the default mode, with TIS) or run on a CUDA GPU (SM80+)")
    if not e.batch_invariant:
        return Check("bit_exact", False, "bit_exact requested but vLLM's batch-invariant mode is off "
                                         "(VLLM_BATCH_INVARIANT was not set before vLLM built its kernels)",
                     "export VLLM_BATCH_INVARIANT=1 before launching")
    return Check("bit_exact", True, "vLLM's batch-invariant kernels on for the engine and (colocated) the trainer; "
                                    "every logprob difference must be 0")


def check_async_scheduling(t: TrainerFacts, e: EngineFacts) -> Check:
    on = e.async_scheduling
    return Check("async_scheduling", not on, f"async scheduling {'on' if on else 'off'}",
                 "set async_scheduling off (trl-correct builds the engine with it off)" if on else "")


STATIC_CHECKS = (check_architecture, check_logprobs_mode, check_dtype, check_lm_head_dtype, check_attention,
                 check_sampler, check_generation_config, check_prefix_cache, check_dropout, check_bit_exact,
                 check_async_scheduling)
# A failing check of these means the trainer cannot even run its side of the probe next to this engine.
BLOCKING = ("architecture",)


def static_checks(t: TrainerFacts, e: EngineFacts) -> list[Check]:
    """Configuration parity from the two sides' facts, in `STATIC_CHECKS` order."""
    return [c for c in (f(t, e) for f in STATIC_CHECKS) if c is not None]


# -- checks of measurements -----------------------------------------------------------------------------------------

def weight_sync_check(stale: list[str], version: int) -> Check:
    """`stale`: engine parameter groups whose fingerprint differs from the trainer's (empty = in sync)."""
    if not stale:
        return Check("weight_sync", True, f"engine weights match the trainer's (sync #{version}, every group "
                                          "fingerprinted)", measured=0, threshold=0)
    shown = ", ".join(stale[:4]) + (f" and {len(stale) - 4} more" if len(stale) > 4 else "")
    return Check("weight_sync", False, f"after sync #{version} the engine differs from the trainer in {len(stale)} "
                                       f"parameter group(s): {shown}",
                 "the weight update did not reach the engine: check the weight names and the load path "
                 "(trl-correct loads through vLLM's reload_weights)", measured=len(stale), threshold=0)


def missed_sync_check(step: int, last_synced: int, called: bool = False) -> Check:
    """The engine generated the batch of `step` without a weight sync at that step (`called`: the sync was called
    and returned without loading anything)."""
    what = ("the weight sync at step {step} returned without loading anything into the engine" if called else
            "no weight sync reached the engine before it generated the batch of step {step}").format(step=step)
    return Check("weight_sync", False, f"{what} (last load at step {last_synced})",
                 "the trainer's sync hook was skipped: make sure sync_weights() streams the weights after every "
                 "update")


def support_check(n_outside: int, label: str = "probe") -> Check:
    """`n_outside` engine-sampled tokens lie outside the trainer's kept set (top-k/top-p/min-p): the two sides do
    not sample from the same support."""
    return Check("sampler_support", not n_outside,
                 f"{label}: {n_outside} token(s) the engine sampled are outside the trainer's kept set "
                 "(probability 0 under the trainer's transform)" if n_outside else f"{label}: every sampled token "
                 "is inside the trainer's kept set",
                 "" if not n_outside else "the engine and trainer filter differently: compare top_k/top_p/min_p "
                                          "and the penalties on both sides (sampler check), then the logits",
                 measured=n_outside, threshold=0)


def mismatch_check(stats: dict, thresholds: dict, label: str = "probe") -> Check:
    """Each statistic in `thresholds` (calibrate.DECIDING: mean, p99, k3, and max as a catastrophic cap) against its
    threshold; no tokens, or a NaN statistic, fails."""
    over = [f"{SHORT[k]}={stats[k]:.3g} > {v:.3g}" for k, v in thresholds.items() if not within(stats[k], v)]
    if stats.get("n_tokens", 0) == 0 and not stats.get("n_nonfinite"):
        over.append("no tokens to compare")
    summary = (f"{label}: {stats.get('n_tokens', 0)} tokens, mean |Δ|={stats['mean_abs_logprob_diff']:.3g}, "
               f"p99={stats['p99_abs_logprob_diff']:.3g}, max={stats['max_abs_logprob_diff']:.3g}, "
               f"k3 KL={stats['kl_k3']:.3g}")
    return Check("mismatch", not over, summary + ("" if not over else "; over threshold: " + ", ".join(over)),
                 "" if not over else "find the failing static check above; if all pass, compare dtypes and "
                                     "kernels, or loosen the thresholds only with a measured reason "
                                     "(trl-correct doctor --calibrate)",
                 measured={k: stats[k] for k in thresholds}, threshold=dict(thresholds))


def non_finite_check(n_nonfinite: int, label: str = "probe") -> Check:
    """NaN/inf logprobs on either side: the tokens are left out of every statistic and of the loss, and named here."""
    return Check("non_finite_logprobs", not n_nonfinite,
                 f"{label}: {n_nonfinite} token(s) with a NaN/inf logprob (trainer or engine), left out of the metrics "
                 "and the loss" if n_nonfinite else f"{label}: every logprob finite on both sides",
                 "" if not n_nonfinite else "look for overflow in the model (bf16/fp16 activations), NaN weights, or "
                                            "tokens the engine returned no logprob for",
                 measured=n_nonfinite, threshold=0)


def reset_check(reset_ok: bool | None) -> Check:
    """The prefix cache's reset after a weight load: vLLM answers False when it refuses (blocks still held)."""
    if reset_ok is None:
        return Check("prefix_cache_reset", True, "prefix caching off: nothing to reset")
    return Check("prefix_cache_reset", bool(reset_ok),
                 "reset_prefix_cache() returned True after the weight load" if reset_ok else
                 "reset_prefix_cache() returned False after the weight load: vLLM refused to drop cached blocks (a "
                 "request still holds them), so KV computed with the old weights can be reused",
                 "" if reset_ok else "finish or abort every in-flight request before the weight sync, or set "
                                     "enable_prefix_caching: false")


def stale_cache_check(cached: dict, fresh: dict, factor: float) -> Check:
    """The probe on prompts whose prefix may be cached vs on prompts that cannot be: `cached` scoring clearly worse
    (more than `factor` x the uncached mean) means KV blocks computed with old weights were reused."""
    c, f = cached["mean_abs_logprob_diff"], fresh["mean_abs_logprob_diff"]
    return Check("prefix_cache", False,
                 f"probe on cached prefixes: mean |Δ|={c:.3g}, max={cached['max_abs_logprob_diff']:.3g}; on uncached "
                 f"ones: mean {f:.3g}, max {fresh['max_abs_logprob_diff']:.3g}: KV blocks computed with old weights "
                 "were reused after the sync",
                 "set enable_prefix_caching: false (or make sure reset_prefix_cache() runs after every weight load)",
                 measured=c / max(f, 1e-30), threshold=factor)


def clip_check(clip_frac: float, max_clip_frac: float, label: str = "probe") -> Check:
    """Share of tokens whose importance weight was truncated or masked: above `max_clip_frac` the correction is no
    longer a small fix of numerical noise but discards or reweights much of the batch."""
    ok = within(clip_frac, max_clip_frac)
    return Check("ratio_clipped", ok, f"{label}: {clip_frac:.1%} of tokens had their importance weight truncated or "
                                      "masked",
                 "" if ok else "the ratios before truncation (correct/ratio/*) say how far off the engine is: fix the "
                               "mismatch; a larger tis_cap or max_clip_frac only hides it",
                 measured=clip_frac, threshold=max_clip_frac)


# Loss audit: the policy term is linear in the importance weights for every TRL loss type but vespo (whose gamma
# weight takes the ratio inside a non-linear function). Relative tolerance on "linear": fp32 measured ~1e-7.
LINEAR_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo")
AUDIT_RTOL = 1e-2
# "Does not change": a step below this share of the value is rounding, not the weights' effect.
STILL_RTOL = 1e-7


def loss_audit_check(losses: list[float], grads: list[float], scales: tuple, linear: bool = True) -> Check:
    """Does the correction reach the loss? `losses`/`grads`: the loss and a fixed projection of its gradient with the
    importance weights multiplied by each of `scales` (0, 1, 2). The weights' effect must be non-zero and, for a
    loss linear in them, grow by the same amount from x1 to x2 as from x0 to x1."""
    name = "correction_not_applied"
    dl = [losses[i + 1] - losses[i] for i in range(len(losses) - 1)]
    dg = [grads[i + 1] - grads[i] for i in range(len(grads) - 1)]
    shown = (f"loss at weights x{', x'.join(f'{s:g}' for s in scales)}: {', '.join(f'{v:.6g}' for v in losses)}; "
             f"gradient projection: {', '.join(f'{v:.6g}' for v in grads)}")
    fix = ("the loss path computes the importance weights but does not apply them (TRL #5031 / Liger #1082): make "
           "the loss multiply each token's policy term by inputs['importance_sampling_ratio']")

    def still(d, ref):
        return not all(math.isfinite(x) for x in d) or abs(d[0]) <= STILL_RTOL * max(abs(ref), 1e-12)

    if still(dl, losses[1]) or still(dg, grads[1]):
        which = "the loss" if still(dl, losses[1]) else "the gradient"
        return Check(name, False, f"{which} does not change when the importance weights change ({shown})", fix)
    if linear:
        off = max(abs(d[1] - d[0]) / abs(d[0]) for d in (dl, dg))
        if off > AUDIT_RTOL:
            return Check(name, False, f"the weights do not enter the loss linearly, as TRL's loss applies them: "
                                      f"x1->x2 changed the loss by {dl[1]:.6g} vs {dl[0]:.6g} for x0->x1 ({shown})",
                         fix, measured=off, threshold=AUDIT_RTOL)
        return Check(name, True, "the importance weights reach the loss and its gradient linearly (x0, x1, x2: equal "
                                 f"steps within {off:.1e})", measured=off, threshold=AUDIT_RTOL)
    return Check(name, True, "the importance weights reach the loss and its gradient")


def temperature_check(at_one: dict, at_t: dict, t: float, thresholds: dict, engine_ignores_t: bool = False) -> Check:
    """Probe at temperature 1 and at `t`: dividing by the temperature once, twice or never is the same at T=1, so a
    trainer that agrees with the engine at 1 but not at `t` applies the temperature a different number of times.
    `engine_ignores_t`: the engine returns raw logprobs (the logprobs_mode check names that), so a temperature-only
    drift is the engine's, not the trainer's."""
    ok1 = mismatch_check(at_one, thresholds).passed
    okt = mismatch_check(at_t, thresholds).passed
    detail = (f"probe at T=1: mean |Δ|={at_one['mean_abs_logprob_diff']:.3g}; at T={t:g}: "
              f"mean |Δ|={at_t['mean_abs_logprob_diff']:.3g}")
    measured = {"at_1": at_one["mean_abs_logprob_diff"], f"at_{t:g}": at_t["mean_abs_logprob_diff"]}
    if engine_ignores_t:
        return Check("temperature", True, detail + " (the engine's logprobs ignore the temperature: see "
                                                   "logprobs_mode)", measured=measured)
    if ok1 and not okt:
        return Check("temperature", False, detail + ": the gap appears only away from T=1, so the trainer divides "
                                                    "by the temperature more or fewer times than the engine",
                     "apply the temperature once, in TRL's scoring head (args.temperature); remove any other "
                     "division of the logits by it (or a generation_config temperature applied by the model)",
                     measured=measured)
    return Check("temperature", True, detail + (" (no temperature-only drift)" if okt else
                                                " (the gap is there at T=1 too: not a temperature fault)"),
                 measured=measured)


def token_identity_check(n_rows: int, n_bad: int, example: str = "", label: str = "batch") -> Check:
    """The trainer must score exactly the token ids the engine sampled; `n_bad` of `n_rows` sequences differ."""
    return Check("token_mismatch", not n_bad,
                 f"{label}: {n_bad} of {n_rows} completion(s) hold token ids the engine did not sample" +
                 (f" ({example})" if example else "") if n_bad else
                 f"{label}: the trainer scores exactly the token ids the engine sampled ({n_rows} completions)",
                 "" if not n_bad else "never decode and re-encode a completion between the engine and the loss: "
                                      "pass the engine's token ids through (multi-turn: append, never re-tokenise)",
                 measured=n_bad, threshold=0)


# Routing (mixture-of-experts). A token-layer "flips" when the engine and the trainer chose different expert sets for
# it. Threshold on the share of flipped token-layers: ROUTING_FACTOR x the trainer's own floor (its probe batch
# scored whole vs one sequence at a time, and at its compute dtype vs fp32), never below the dtype's minimum (a flip
# or two of a near-tie among a few hundred token-layers is rounding, not a fault).
ROUTING_FACTOR = 4.0
ROUTING_MINIMUMS = {"float32": 0.01, "float32@cuda": 0.01, "bfloat16": 0.05, "float16": 0.02}
# with replay on, the trainer must compute every replayed token-layer with the engine's experts: no slack
ROUTING_FIX = ("set routing_replay: true (the trainer then computes each token with the experts the engine chose, "
               "R3); flips far above the floor point at stale router weights on the engine (weight_sync), a router "
               "computed in another dtype on one side, or top-k normalisation (norm_topk_prob) handled differently")


def routing_threshold(floor: dict | None, dtype_key: str) -> tuple[float, str]:
    """(threshold on the flipped token-layer share, its rule in words) from the routing floor (None: not measured)."""
    lo = ROUTING_MINIMUMS.get(dtype_key, ROUTING_MINIMUMS["bfloat16"])
    if not floor or not floor.get("n_token_layers"):
        return lo, f"{dtype_key} minimum (no floor measured)"
    derived = ROUTING_FACTOR * floor["flip_frac_token_layer"]
    if derived < lo:
        return lo, f"{ROUTING_FACTOR:g} x floor {floor['flip_frac_token_layer']:.3g} = {derived:.3g}, raised to the " \
                   f"{dtype_key} minimum"
    return derived, f"{ROUTING_FACTOR:g} x floor {floor['flip_frac_token_layer']:.3g}"


def routing_check(figures: dict, floor: dict | None, dtype_key: str, label: str = "probe") -> Check:
    """Do the engine's and the trainer's routers send the same tokens to the same experts? `figures`: the engine's
    experts vs the trainer's own router top-k on the same tokens (numerics.routing_flips), and with replay on,
    `replay`: the same figures for the experts the trainer really computed with (must be the engine's: 0 flips).
    `floor`: the trainer against itself (None: not measured). Replay off: the flipped token-layer share must stay
    within `routing_threshold`; replay on: every replayed token-layer must use the engine's experts."""
    tl, tok = figures["flip_frac_token_layer"], figures["flip_frac_token"]
    limit, rule = routing_threshold(floor, dtype_key)
    shown = (f"{label}: experts differ between engine and trainer router on {tl:.2%} of token-layers, {tok:.2%} of "
             f"tokens ({figures['n_token_layers']} token-layers, {figures['n_tokens']} tokens)")
    if floor and floor.get("n_token_layers"):
        name = FLOOR_NAMES.get(floor.get("source"), "trainer vs itself")
        shown += f"; floor {floor['flip_frac_token_layer']:.2%} / {floor['flip_frac_token']:.2%} ({name})"
    measured = {"flip_frac_token_layer": tl, "flip_frac_token": tok}
    replay = figures.get("replay")
    if replay is not None:
        off = replay["flip_frac_token_layer"]
        without, with_ = figures.get("mismatch_without_replay"), figures.get("mismatch_with_replay")
        lp = (f"; mean |Δlogp| {without['mean_abs_logprob_diff']:.3g} without replay, "
              f"{with_['mean_abs_logprob_diff']:.3g} with" if without and with_ else "")
        measured["replay_flip_frac_token_layer"] = off
        if off > 0:
            return Check("routing", False, shown + f"; replay on, but the trainer computed {off:.2%} of the replayed "
                                                   "token-layers with experts other than the engine's" + lp,
                         "the replayed experts are not aligned with the tokens: each token must get the engine's "
                         "experts for that same token and position (prompt + completion, left-padded prompt)",
                         measured=measured, threshold={"replay_flip_frac_token_layer": 0.0})
        return Check("routing", True, shown + f" (limit {limit:.3g}: {rule}); replay on: the trainer computes with "
                                              "the engine's experts" + lp, measured=measured,
                     threshold={"flip_frac_token_layer": limit})
    ok = within(tl, limit)
    return Check("routing", ok, shown + f" (limit {limit:.3g}: {rule})", "" if ok else ROUTING_FIX,
                 measured=measured, threshold={"flip_frac_token_layer": limit})


def routing_unavailable_check(why: str, replay: bool) -> Check:
    """An MoE model whose engine routing cannot be read (`why`): nothing to compare the trainer's routers with; with
    replay on, nothing to replay, so the trainer would silently compute with its own experts."""
    if replay:
        return Check("routing", False, f"routing_replay is on but the engine's routing cannot be read: {why}",
                     "set routing_replay: false, or use an engine whose routing trl-correct can read (colocated "
                     "vLLM with fused-MoE layers, or vLLM's routed-experts output on a GPU)")
    return Check("routing", True, f"the engine's routing cannot be read ({why}): routing not compared")


def self_consistency_check(stats: dict, caps: dict) -> Check:
    """The trainer's own logprobs of one batch scored whole and one sequence at a time: the floor the thresholds are
    calibrated from. Over a catastrophic cap (`caps`: calibrate.CAPS of the dtype) the trainer disagrees with itself
    by more than any healthy implementation does, and no threshold derived from that floor would mean anything."""
    keys = [k for k in ("mean_abs_logprob_diff", "p99_abs_logprob_diff", "max_abs_logprob_diff") if k in caps]
    over = [f"{SHORT[k]} {stats[k]:.3g} > {caps[k]:.3g}" for k in keys if not within(stats[k], caps[k])]
    ok = not over and not stats.get("n_nonfinite")
    return Check("trainer_consistency", ok,
                 f"trainer vs itself (micro-batch {stats.get('batch_size', '?')} vs 1): max |Δ|="
                 f"{stats['max_abs_logprob_diff']:.3g}, mean {stats['mean_abs_logprob_diff']:.3g}"
                 + (f"; over the cap: {', '.join(over)}" if over else ""),
                 "" if ok else "the trainer's logprobs depend on batch composition or padding: check the attention "
                               "mask / position ids the model receives for padded rows",
                 measured={k: stats[k] for k in keys}, threshold={k: caps[k] for k in keys})



