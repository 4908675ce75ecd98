"""Pure numerics of trainer/engine mismatch: gaps, k3 KL, truncated importance weights, effective sample size.

Plain torch on tensors; knows nothing of vLLM or TRL, so every formula here is unit-tested on hand-made tensors.
Convention: r = trainer_logprobs - engine_logprobs per token. Tokens are sampled by the engine, so the importance
weight of a token is exp(r), and k3 = exp(r) - r - 1 estimates KL(engine || trainer) (Schulman's k3).
Shapes: [B, T] logprobs with a [B, T] mask of the tokens that count (completion tokens, not padding or tool output).
"""

import math
from dataclasses import dataclass
from typing import Callable

import torch

from .sampler import OUTSIDE_LOGPROB

TIS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
MISMATCH_KEYS = ("mean_abs_logprob_diff", "p99_abs_logprob_diff", "max_abs_logprob_diff", "kl_k3",
                 "ratio_outside_frac", "n_tokens", "n_nonfinite")
# The write-up's health band for token ratios: exp(r) outside [0.8, 1.25] (symmetric in log space) counts as off-policy.
RATIO_BAND = (0.8, 1.25)
# The TIS cap's band: a ratio outside [0.5, 2] is one the default cap (2) truncates, or its mirror image.
WIDE_BAND = (0.5, 2.0)
# torch.quantile refuses inputs over 2**24 elements ("quantile() input tensor is too large"); above it the nearest-rank
# quantile by kthvalue (linear time, no size limit) is used instead.
QUANTILE_MAX_ELEMENTS = 2**24
# math.exp overflows above ~709.78: ratios are reported as exp(min(log ratio, EXP_MAX)).
EXP_MAX = 700.0



def valid_gaps(trainer_logprobs: torch.Tensor, engine_logprobs: torch.Tensor, mask: torch.Tensor):
    """Flat tensor of r = trainer - engine over masked, finite tokens (float64), and the count of non-finite ones.

    A non-finite logprob on either side is never averaged into a statistic: it is counted instead.
    """
    r = trainer_logprobs.detach().double() - engine_logprobs.detach().double()
    m = mask.bool()
    finite = torch.isfinite(r)
    return r[m & finite], int((m & ~finite).sum())


def quantiles(x: torch.Tensor, qs: tuple) -> list[float]:
    """Quantiles of a flat tensor (linear interpolation; nearest rank above QUANTILE_MAX_ELEMENTS)."""
    if x.numel() <= QUANTILE_MAX_ELEMENTS:
        return torch.quantile(x, torch.tensor(qs, dtype=x.dtype, device=x.device)).tolist()
    n = x.numel()
    return [float(x.kthvalue(min(n, max(1, math.ceil(q * n)))).values) for q in qs]


def summarize_gaps(r: torch.Tensor, n_nonfinite: int = 0) -> dict:
    """Mismatch statistics of a flat tensor of gaps r (see module docstring). Empty input gives zeros."""
    if r.numel() == 0:
        return dict(mean_abs_logprob_diff=0.0, p99_abs_logprob_diff=0.0, max_abs_logprob_diff=0.0, kl_k3=0.0,
                    ratio_outside_frac=0.0, n_tokens=0, n_nonfinite=n_nonfinite)
    a = r.abs()
    return dict(
        mean_abs_logprob_diff=a.mean().item(),
        p99_abs_logprob_diff=quantiles(a, (0.99,))[0],
        max_abs_logprob_diff=a.max().item(),
        kl_k3=(torch.expm1(r) - r).mean().item(),
        ratio_outside_frac=((r < math.log(RATIO_BAND[0])) | (r > math.log(RATIO_BAND[1]))).double().mean().item(),
        n_tokens=int(r.numel()),
        n_nonfinite=n_nonfinite,
    )


def is_weights(trainer_logprobs: torch.Tensor, engine_logprobs: torch.Tensor, mask: torch.Tensor, mode: str,
               cap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated / masked importance weights exp(r) capped at `cap`.

    Returns (weights, hit_cap): weights [B, T] for token modes, [B, 1] for sequence modes (sum of masked r per
    sequence); hit_cap [B, T] bool, true where the token's weight was truncated or masked (for sequence modes,
    every masked token of a capped sequence). Non-finite tokens get weight 0 in token modes and zero their sequence
    in sequence modes: an unscored token must not be trained on as if it were on-policy.
    """
    if mode not in TIS_MODES:
        raise ValueError(f"tis_mode={mode!r} is unknown; use one of {', '.join(TIS_MODES)}")
    r = (trainer_logprobs.detach().float() - engine_logprobs.detach().float())
    m = mask.bool()
    bad = m & ~torch.isfinite(r)
    r = torch.where(m & ~bad, r, torch.zeros_like(r))
    if mode.startswith("sequence"):
        r = r.sum(dim=-1, keepdim=True)
        bad = bad.any(dim=-1, keepdim=True)
    # exp of a large r overflows to inf; clamping r first keeps the comparison exact for any cap below e^80
    ratio = torch.exp(r.clamp(max=80.0))
    over = ratio > cap
    if mode.endswith("truncate"):
        w = torch.where(over, torch.full_like(ratio, cap), ratio)
        hit = ratio >= cap
    else:
        w = torch.where(over, torch.zeros_like(ratio), ratio)
        hit = over
    w = torch.where(bad, torch.zeros_like(w), w)
    hit_tokens = (hit | bad).expand_as(m) & m
    return w, hit_tokens


def weight_stats(w: torch.Tensor, hit: torch.Tensor) -> dict:
    """clip_frac (share of tokens whose weight hit the cap) and normalised ESS (Σw)² / (N Σw²) of flat per-token
    weights; ESS 1.0 means uniform weights. Empty input gives clip_frac 0 and ess 1."""
    w = w.double()
    n = w.numel()
    sq = float((w * w).sum())
    return dict(clip_frac=float(hit.sum()) / n if n else 0.0,
                ess=(float(w.sum()) ** 2 / (n * sq) if sq > 0 else 0.0) if n else 1.0)


def sequence_gaps(trainer_logprobs: torch.Tensor, engine_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Flat float64 sum of r over each sequence's counted finite tokens (the log of the ratio sequence-level IS weighs
    by), for sequences with at least one such token. Args [B, T]."""
    r = trainer_logprobs.detach().double() - engine_logprobs.detach().double()
    ok = mask.bool() & torch.isfinite(r)
    return torch.where(ok, r, torch.zeros_like(r)).sum(dim=-1)[ok.any(dim=-1)]


def ratio_stats(r: torch.Tensor, r_seq: torch.Tensor, w: torch.Tensor) -> dict:
    """Importance-ratio diagnostics taken BEFORE truncation or masking (TRL #5231: statistics of the capped weights
    let a healthy-looking mean hide a masked majority). All flat: r = per-token log ratios (`valid_gaps`), r_seq =
    per-sequence log ratios (`sequence_gaps`), w = each counted token's applied weight (`per_token` of `is_weights`).

    Returns ratio_min/p1/p99/max of exp(r); tokens_/seqs_outside_0.5_2 and _0.8_1.25: shares of token / sequence
    ratios outside those bands; masked_frac: share of tokens whose applied weight is 0 (masked, or unscorable; the
    share truncated or masked is `weight_stats`' clip_frac). Empty input gives ratio 1 and zero shares.
    """
    def exp(x):
        return math.exp(min(float(x), EXP_MAX))

    def outside(x, band):
        return float(((x < math.log(band[0])) | (x > math.log(band[1]))).double().mean()) if x.numel() else 0.0

    out = dict(ratio_min=1.0, ratio_p1=1.0, ratio_p99=1.0, ratio_max=1.0)
    if r.numel():
        r = r.double()
        lo, hi = quantiles(r, (0.01, 0.99))
        out = dict(ratio_min=exp(r.min()), ratio_p1=exp(lo), ratio_p99=exp(hi), ratio_max=exp(r.max()))
    n = w.numel()
    out.update({"tokens_outside_0.5_2": outside(r, WIDE_BAND), "tokens_outside_0.8_1.25": outside(r, RATIO_BAND),
                "seqs_outside_0.5_2": outside(r_seq, WIDE_BAND), "seqs_outside_0.8_1.25": outside(r_seq, RATIO_BAND),
                "masked_frac": float((w == 0).sum()) / n if n else 0.0})
    return out


def nonfinite_tokens(trainer_logprobs: torch.Tensor, engine_logprobs: torch.Tensor, mask: torch.Tensor):
    """[B, T] bool: counted tokens whose logprob is NaN/inf on either side (must leave the loss and every metric)."""
    return mask.bool() & ~(torch.isfinite(trainer_logprobs) & torch.isfinite(engine_logprobs))


def per_token(weights: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Flat weight of each masked token; [B, 1] sequence weights count once per masked token of their sequence."""
    return weights.expand_as(mask)[mask.bool()]


@dataclass(frozen=True)
class Measurement:
    """What `measure` found on one batch of tokens (a probe, or a training batch gathered over ranks)."""

    stats: dict  # summarize_gaps + weight_stats + ratio_stats + n_outside_support (over every rank gathered)
    gaps: torch.Tensor  # |r| of this rank's counted tokens, float32 on the CPU (the doctor's plot)
    weights: torch.Tensor  # the correction's weights, [B, T] or [B, 1]
    keep: torch.Tensor  # [B, T] bool: counted tokens (masked, finite on both sides, inside the trainer's support)
    trainer_logprobs: torch.Tensor  # [B, T], non-finite entries replaced by 0 (they are out of `keep`)
    engine_logprobs: torch.Tensor  # [B, T], likewise


def _same(x: torch.Tensor) -> torch.Tensor:
    return x


def measure(trainer_logprobs: torch.Tensor, engine_logprobs: torch.Tensor, mask: torch.Tensor,
            correction: Callable, gather: Callable = _same) -> Measurement:
    """Every per-batch figure the gate decides on, for the probe and for each training batch alike.

    Args [B, T]; `correction(trainer_logprobs, engine_logprobs, keep) -> (weights, hit)` (numerics.is_weights or a
    subclass's); `gather(flat tensor) -> flat tensor` concatenates over ranks (identity on one process). Tokens the
    trainer scores outside its kept set (OUTSIDE_LOGPROB) or with a NaN/inf logprob on either side are counted
    (n_outside_support, n_nonfinite) and left out of every statistic and of `keep`.
    """
    m = mask.bool()
    outside = m & (trainer_logprobs <= OUTSIDE_LOGPROB / 2)
    nonfinite = nonfinite_tokens(trainer_logprobs, engine_logprobs, m)
    keep = m & ~outside & ~nonfinite
    t = torch.where(nonfinite, torch.zeros_like(trainer_logprobs), trainer_logprobs)
    e = torch.where(nonfinite, torch.zeros_like(engine_logprobs), engine_logprobs)
    w, hit = correction(t, e, keep)
    r = (t.detach().double() - e.detach().double())[keep]
    counts = gather(torch.tensor([float(outside.sum()), float(nonfinite.sum())], dtype=torch.float64,
                                 device=r.device)).view(-1, 2).sum(0)
    n_outside, n_nonfinite = int(counts[0]), int(counts[1])
    r_all, w_all = gather(r), gather(per_token(w, keep).double())
    hit_all, seq_all = gather(hit[keep].double()), gather(sequence_gaps(t, e, keep))
    stats = dict(summarize_gaps(r_all, n_nonfinite), n_outside_support=n_outside)
    stats.update(weight_stats(w_all, hit_all))
    stats.update(ratio_stats(r_all, seq_all, w_all))
    return Measurement(stats, r.abs().float().cpu(), w, keep, t, e)


def within(value: float, threshold: float) -> bool:
    """value <= threshold, false for NaN (a NaN statistic never passes)."""
    return not math.isnan(value) and value <= threshold


# -- mixture-of-experts routing ---------------------------------------------------------------------------------------
ROUTING_KEYS = ("flip_frac_token_layer", "flip_frac_token", "n_token_layers", "n_tokens")


def routing_flips(a: list, b: list) -> dict:
    """How often two sides' routers chose different experts for the same tokens. `a`, `b`: per sequence, rows
    [n, L, k] of expert ids (the same layers in the same order; -1 where a side has no id: not routed, not covered).
    A token-layer counts where both sides have all k ids; it flips when the two sets of k experts differ (the order
    within the top-k does not matter). A token counts where at least one of its layers counts, and flips when any
    of them does. Returns ROUTING_KEYS: the two flip shares and what they are shares of."""
    n_tl = flips_tl = n_tok = flips_tok = 0
    for x, y in zip(a, b):
        if x is None or y is None:
            continue
        n = min(x.shape[0], y.shape[0])
        x, y = x[:n].long(), y[:n].long()
        both = (x >= 0).all(-1) & (y >= 0).all(-1)  # [n, L]
        differ = (x.sort(-1).values != y.sort(-1).values).any(-1) & both
        n_tl += int(both.sum())
        flips_tl += int(differ.sum())
        counted = both.any(-1)
        n_tok += int(counted.sum())
        flips_tok += int(differ.any(-1).sum())
    return {"flip_frac_token_layer": flips_tl / n_tl if n_tl else 0.0,
            "flip_frac_token": flips_tok / n_tok if n_tok else 0.0, "n_token_layers": n_tl, "n_tokens": n_tok}
