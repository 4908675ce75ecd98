"""The correctness gate as data: named checks, each with pass/fail, what was measured and the fix.

Deciding is a pure function of facts and measurements gathered elsewhere (engine.py reports the engine's side,
trainer.py the trainer's). Nothing here imports vLLM or TRL, so every check is tested on hand-made facts.
A failed check's `name` is the *cause* reported everywhere (logs, exceptions, correctness_report.json).

Check names: logprobs_mode, dtype, lm_head_dtype, sampler, generation_config, prefix_cache, dropout, bit_exact,
prefix_cache_reset, async_scheduling, weight_sync, mismatch, sampler_support, non_finite_logprobs, ratio_clipped,
correction_not_applied, temperature, token_mismatch, trainer_consistency.
"""

import math

from dataclasses import asdict, dataclass, field

from .numerics import within

SAMPLER_FIELDS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                  "frequency_penalty")
NEUTRAL = dict(top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0)


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str
    fix: str = ""


@dataclass(frozen=True)
class GateReport:
    checks: tuple[Check, ...]
    mismatch: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def causes(self) -> list[str]:
        return [c.name for c in self.checks if not c.passed]

    def to_dict(self) -> dict:
        return {"verdict": "pass" if self.passed else "fail", "causes": self.causes,
                "checks": [asdict(c) for c in self.checks], "mismatch": dict(self.mismatch)}

    def table(self) -> str:
        width = max(len(c.name) for c in self.checks) if self.checks else 4
        lines = [f"correctness gate: {'PASS' if self.passed else 'FAIL: ' + ', '.join(self.causes)}"]
        for c in self.checks:
            lines.append(f"  {'ok  ' if c.passed else 'FAIL'} {c.name:<{width}}  {c.detail}")
            if not c.passed and c.fix:
                lines.append(f"       {'':<{width}}  fix: {c.fix}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


class GateFailure(RuntimeError):
    """Raised under gate='enforce' when the gate fails; carries the report."""

    def __init__(self, report: GateReport, when: str = "before training"):
        self.report = report
        super().__init__(f"trl-correct gate failed {when} (causes: {', '.join(report.causes)})\n{report.table()}")


def _norm(name: str, value):
    """Settings that mean 'off' compare equal: top_k 0/-1/None, min_p None/0."""
    if value is None:
        return NEUTRAL.get(name)
    if name == "top_k" and value < 0:
        return 0
    return float(value)


def static_checks(trainer: dict, engine: dict) -> list[Check]:
    """Configuration parity from facts. `trainer` keys: compute_dtype, head_dtype, want_fp32_head, plus the
    SAMPLER_FIELDS it applies when scoring. `engine` keys: the same plus logprobs_mode, prefix_caching,
    reset_after_sync, async_scheduling, head_dtype_supported, generation_config (dict of the model's defaults)."""
    checks = []
    t_temp = float(engine.get("temperature", 1.0))
    transforms = [f for f in SAMPLER_FIELDS[1:] if _norm(f, engine.get(f)) != _norm(f, None)]
    mode = engine["logprobs_mode"]
    if mode == "processed_logprobs":
        checks.append(Check("logprobs_mode", True, "engine returns processed_logprobs (after temperature etc.)"))
    elif mode == "raw_logprobs" and t_temp == 1.0 and not transforms:
        checks.append(Check("logprobs_mode", True, "engine returns raw_logprobs; equal to processed at T=1 with "
                                                   "no other sampler transform"))
    else:
        checks.append(Check("logprobs_mode", False,
                            f"engine returns {mode} at temperature={t_temp:g}"
                            + (f" with {', '.join(transforms)}" if transforms else "")
                            + ": they ignore the sampler, so ratios compare different distributions",
                            "set logprobs_mode: processed_logprobs"))

    same = trainer["compute_dtype"] == engine["compute_dtype"]
    checks.append(Check("dtype", same, f"trainer computes in {trainer['compute_dtype']}, engine in "
                                       f"{engine['compute_dtype']}",
                        "" if same else "set the engine dtype to the trainer's (vllm_dtype: auto follows the "
                                        "trainer) or train in the engine's dtype (bf16: true / false)"))

    th, eh = trainer["head_dtype"], engine["head_dtype"]
    if trainer.get("want_fp32_head") and not engine.get("head_dtype_supported", True):
        checks.append(Check("lm_head_dtype", False, f"fp32_lm_head requested but the installed vLLM cannot run "
                                                    f"an fp32 head (engine head in {eh}, trainer head in {th})",
                            "install a vLLM with hf_overrides head_dtype (>= 0.26), or set fp32_lm_head: false "
                            "on both sides"))
    else:
        ok = th == eh and (not trainer.get("want_fp32_head") or th == "float32")
        checks.append(Check("lm_head_dtype", ok, f"lm_head computes in {th} (trainer) and {eh} (engine)",
                            "" if ok else "set fp32_lm_head: true so both sides run the head in float32"))

    diffs = [f"{f}: trainer {trainer.get(f, NEUTRAL.get(f))} vs engine {engine.get(f, NEUTRAL.get(f))}"
             for f in SAMPLER_FIELDS if _norm(f, trainer.get(f)) != _norm(f, engine.get(f))]
    fix = "set sampler settings once, as config fields (temperature, top_k, top_p, min_p, repetition_penalty, " \
          "presence_penalty, frequency_penalty), never in generation_kwargs or on one side only"
    if engine.get("unreproduced"):
        diffs.append(f"engine applies {sorted(engine['unreproduced'])} (generation_kwargs), which the trainer does "
                     "not reproduce")
        fix = "remove " + ", ".join(sorted(engine["unreproduced"])) + " from generation_kwargs"
    if trainer.get("sampler_unreproducible"):
        diffs.append(f"trainer cannot reproduce the transform: {trainer['sampler_unreproducible']}")
        fix = "use a sampler with temperature only for this model (top_k 0, top_p 1, min_p 0, no penalties)"
    if "sampler_order" in trainer and list(trainer["sampler_order"]) != list(engine.get("sampler_order", [])):
        diffs.append(f"engine applies {engine.get('sampler_order')}, trainer reproduces {trainer['sampler_order']}")
        fix = "use a vLLM whose sampler order trl-correct knows (0.26-0.31)"
    checks.append(Check("sampler", not diffs,
                        "; ".join(diffs) if diffs else
                        f"both sides sample/score at temperature={t_temp:g}"
                        + (f" with {', '.join(transforms)} (trainer reproduces the engine's transform)"
                           if transforms else ", no other transform"),
                        "" if not diffs else fix))

    gen = engine.get("generation_config") or {}
    applied = trainer.get("sampler_defaults_applied") or {}
    wrong = {k: engine.get(k) for k, v in applied.items() if _norm(k, v) != _norm(k, engine.get(k))}
    ignored = {k: v for k, v in gen.items()
               if k in SAMPLER_FIELDS and k not in applied and _norm(k, v) != _norm(k, engine.get(k))}
    parts = [f"model generation_config defaults in effect on both sides: {applied}"] if applied else []
    if ignored:
        parts.append("model generation_config defaults not in effect on either side (the config's values are used "
                     f"on both): {ignored}")
    detail = "; ".join(parts) or "model generation_config sets no sampler default that differs from the config"
    if wrong:
        detail = f"model generation_config defaults {applied} applied by the trainer, engine uses {wrong}"
    checks.append(Check("generation_config", not wrong, detail,
                        "" if not wrong else "build the engine from the trainer's sampler (engine_settings)"))

    if not engine["prefix_caching"]:
        checks.append(Check("prefix_cache", True, "prefix caching off"))
    else:
        ok = bool(engine.get("reset_after_sync"))
        checks.append(Check("prefix_cache", ok, "prefix caching on, " + (
            "cache reset after every weight sync" if ok else "cache NOT reset after weight sync: KV blocks "
                                                             "computed with old weights are reused"),
                            "" if ok else "set enable_prefix_caching: false"))
    drop = trainer.get("dropout") or []
    checks.append(Check("dropout", not drop, "the trainer's forward draws dropout while training: " + "; ".join(drop)
                        + " (its logprobs are random draws; the engine has no dropout)" if drop else
                        "no dropout in the trainer's forward", "" if not drop else
                        "set the dropout rates to 0 (lora_dropout: 0; the model config's attention/hidden dropout)"))
    if trainer.get("bit_exact"):
        checks.append(bit_exact_check(engine.get("batch_invariant_unsupported"), bool(engine.get("batch_invariant"))))
    asyn = bool(engine["async_scheduling"])
    checks.append(Check("async_scheduling", not asyn, f"async scheduling {'on' if asyn else 'off'}",
                        "set async_scheduling off (trl-correct builds the engine with it off)" if asyn else ""))
    return checks


def bit_exact_check(unsupported: str | None, active: bool) -> Check:
    """bit_exact requested: vLLM's batch-invariant mode must be possible here and on (colocated, the engine's
    aten overrides are the trainer's too); the probe and every batch then have to match exactly (thresholds 0)."""
    if unsupported:
        return Check("bit_exact", False, f"bit_exact requested: {unsupported}",
                     "set bit_exact: false (the default mode, with TIS) or run on a CUDA GPU (SM80+)")
    if not active:
        return Check("bit_exact", False, "bit_exact requested but vLLM's batch-invariant mode is off "
                                         "(VLLM_BATCH_INVARIANT was not set before vLLM built its kernels)",
                     "export VLLM_BATCH_INVARIANT=1 before launching")
    return Check("bit_exact", True, "vLLM's batch-invariant kernels on for the engine and (colocated) the trainer; "
                                    "every logprob difference must be 0")


def weight_sync_check(stale: list[str], version: int) -> Check:
    """`stale`: engine parameter groups whose fingerprint differs from the trainer's (empty = in sync)."""
    if not stale:
        return Check("weight_sync", True, f"engine weights match the trainer's (sync #{version}, every group "
                                          "fingerprinted)")
    shown = ", ".join(stale[:4]) + (f" and {len(stale) - 4} more" if len(stale) > 4 else "")
    return Check("weight_sync", False, f"after sync #{version} the engine differs from the trainer in {len(stale)} "
                                       f"parameter group(s): {shown}",
                 "the weight update did not reach the engine: check the weight names and the load path "
                 "(trl-correct loads through vLLM's reload_weights)")


def support_check(n_outside: int, label: str = "probe") -> Check:
    """`n_outside` engine-sampled tokens lie outside the trainer's kept set (top-k/top-p/min-p): the two sides do
    not sample from the same support."""
    return Check("sampler_support", not n_outside,
                 f"{label}: {n_outside} token(s) the engine sampled are outside the trainer's kept set "
                 "(probability 0 under the trainer's transform)" if n_outside else f"{label}: every sampled token "
                 "is inside the trainer's kept set",
                 "" if not n_outside else "the engine and trainer filter differently: compare top_k/top_p/min_p "
                                          "and the penalties on both sides (sampler check), then the logits")


def mismatch_check(stats: dict, thresholds: dict, label: str = "probe") -> Check:
    """Compare mean/max |Δlogp| and k3 KL with thresholds (keys as in `stats`); non-finite tokens fail."""
    over = [f"{k}={stats[k]:.3g} > {thresholds[k]:.3g}" for k in ("mean_abs_logprob_diff", "max_abs_logprob_diff",
                                                                  "kl_k3") if not within(stats[k], thresholds[k])]
    if stats.get("n_tokens", 0) == 0 and not stats.get("n_nonfinite"):
        over.append("no tokens to compare")
    summary = (f"{label}: {stats.get('n_tokens', 0)} tokens, mean |Δ|={stats['mean_abs_logprob_diff']:.3g}, "
               f"p99={stats['p99_abs_logprob_diff']:.3g}, max={stats['max_abs_logprob_diff']:.3g}, "
               f"k3 KL={stats['kl_k3']:.3g}")
    return Check("mismatch", not over, summary + ("" if not over else "; over threshold: " + ", ".join(over)),
                 "" if not over else "find the failing static check above; if all pass, compare dtypes and "
                                     "kernels, or loosen the thresholds only with a measured reason")


def non_finite_check(n_nonfinite: int, label: str = "probe") -> Check:
    """NaN/inf logprobs on either side: the tokens are left out of every statistic and of the loss, and named here."""
    return Check("non_finite_logprobs", not n_nonfinite,
                 f"{label}: {n_nonfinite} token(s) with a NaN/inf logprob (trainer or engine), left out of the metrics "
                 "and the loss" if n_nonfinite else f"{label}: every logprob finite on both sides",
                 "" if not n_nonfinite else "look for overflow in the model (bf16/fp16 activations), NaN weights, or "
                                            "tokens the engine returned no logprob for")


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


def clip_check(clip_frac: float, max_clip_frac: float, label: str = "probe") -> Check:
    """Share of tokens whose importance weight was truncated or masked: above `max_clip_frac` the correction is no
    longer a small fix of numerical noise but discards or reweights much of the batch."""
    ok = within(clip_frac, max_clip_frac)
    return Check("ratio_clipped", ok, f"{label}: {clip_frac:.1%} of tokens had their importance weight truncated or "
                                      f"masked (limit {max_clip_frac:.0%})",
                 "" if ok else "the ratios before truncation (correct/ratio/*) say how far off the engine is: fix the "
                               "mismatch; a larger tis_cap or max_clip_frac only hides it")


# Loss audit: the policy term is linear in the importance weights for every TRL loss type but vespo (whose gamma
# weight takes the ratio inside a non-linear function). Relative tolerance on "linear": fp32 measured ~1e-7.
LINEAR_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo")
AUDIT_RTOL = 1e-2


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
        return not all(math.isfinite(x) for x in d) or abs(d[0]) <= 1e-7 * max(abs(ref), 1e-12)

    if still(dl, losses[1]) or still(dg, grads[1]):
        which = "the loss" if still(dl, losses[1]) else "the gradient"
        return Check(name, False, f"{which} does not change when the importance weights change ({shown})", fix)
    if linear:
        off = [abs(d[1] - d[0]) / abs(d[0]) for d in (dl, dg)]
        if max(off) > AUDIT_RTOL:
            return Check(name, False, f"the weights do not enter the loss linearly, as TRL's loss applies them: "
                                      f"x1->x2 changed the loss by {dl[1]:.6g} vs {dl[0]:.6g} for x0->x1 ({shown})",
                         fix)
    return Check(name, True, "the importance weights reach the loss and its gradient"
                 + (" linearly (x0, x1, x2: equal steps within " + f"{max(off):.1e})" if linear else ""))


def temperature_check(at_one: dict, at_t: dict, t: float, thresholds: dict, engine_ignores_t: bool = False) -> Check:
    """Probe at temperature 1 and at `t`: dividing by the temperature once, twice or never is the same at T=1, so a
    trainer that agrees with the engine at 1 but not at `t` applies the temperature a different number of times.
    `engine_ignores_t`: the engine returns raw logprobs (the logprobs_mode check names that), so a temperature-only
    drift is the engine's, not the trainer's."""
    ok1 = mismatch_check(at_one, thresholds).passed
    okt = mismatch_check(at_t, thresholds).passed
    detail = (f"probe at T=1: mean |Δ|={at_one['mean_abs_logprob_diff']:.3g}; at T={t:g}: "
              f"mean |Δ|={at_t['mean_abs_logprob_diff']:.3g}")
    if engine_ignores_t:
        return Check("temperature", True, detail + " (the engine's logprobs ignore the temperature: see "
                                                   "logprobs_mode)")
    if ok1 and not okt:
        return Check("temperature", False, detail + ": the gap appears only away from T=1, so the trainer divides "
                                                    "by the temperature more or fewer times than the engine",
                     "apply the temperature once, in TRL's scoring head (args.temperature); remove any other "
                     "division of the logits by it (or a generation_config temperature applied by the model)")
    return Check("temperature", True, detail + (" (no temperature-only drift)" if okt else
                                                " (the gap is there at T=1 too: not a temperature fault)"))


def token_identity_check(n_rows: int, n_bad: int, example: str = "", label: str = "batch") -> Check:
    """The trainer must score exactly the token ids the engine sampled; `n_bad` of `n_rows` sequences differ."""
    return Check("token_mismatch", not n_bad,
                 f"{label}: {n_bad} of {n_rows} completion(s) hold token ids the engine did not sample" +
                 (f" ({example})" if example else "") if n_bad else
                 f"{label}: the trainer scores exactly the token ids the engine sampled ({n_rows} completions)",
                 "" if not n_bad else "never decode and re-encode a completion between the engine and the loss: "
                                      "pass the engine's token ids through (multi-turn: append, never re-tokenise)")


def self_consistency_check(stats: dict, max_abs: float) -> Check:
    """The trainer's own logprobs of one batch scored whole and one sequence at a time: the floor under any
    engine comparison. Above `max_abs` the trainer disagrees with itself by more than the gate allows."""
    ok = within(stats["max_abs_logprob_diff"], max_abs) and not stats.get("n_nonfinite")
    return Check("trainer_consistency", ok,
                 f"trainer vs itself (micro-batch {stats.get('batch_size', '?')} vs 1): max |Δ|="
                 f"{stats['max_abs_logprob_diff']:.3g}, mean {stats['mean_abs_logprob_diff']:.3g}" +
                 ("" if ok else f" > {max_abs:.3g}"),
                 "" if ok else "the trainer's logprobs depend on batch composition or padding: check the attention "
                               "mask / position ids the model receives for padded rows")
