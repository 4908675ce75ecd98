"""Pure numerics on hand-made tensors: gaps, k3 KL, capped importance weights, ESS."""

import math

import pytest
import torch

from trl_correct.adapters.audit import token_identity
from trl_correct.core.numerics import (QUANTILE_MAX_ELEMENTS, is_weights, measure, nonfinite_tokens, per_token, quantiles,
                                  ratio_stats, sequence_gaps, summarize_gaps, valid_gaps, weight_stats)
from trl_correct.core.sampler import OUTSIDE_LOGPROB

pytestmark = pytest.mark.unit  # builds no engine, starts no subprocess (tests/conftest.py)


def t(x):
    return torch.tensor(x, dtype=torch.float32)


def mismatch_stats(trainer, engine, mask):
    return summarize_gaps(*valid_gaps(trainer, engine, mask))


def token_truncate(trainer, engine, mask):
    return is_weights(trainer, engine, mask, "token_truncate", 2.0)


def test_mismatch_stats_hand_computed():
    trainer = t([[-1.0, -2.0, -3.0], [-0.5, -0.5, 0.0]])
    engine = t([[-1.1, -2.0, -2.5], [-0.5, -0.7, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    s = mismatch_stats(trainer, engine, mask)
    r = torch.tensor([0.1, 0.0, -0.5, 0.0, 0.2], dtype=torch.float64)
    assert s["n_tokens"] == 5 and s["n_nonfinite"] == 0
    assert s["mean_abs_logprob_diff"] == pytest.approx(0.8 / 5, rel=1e-6)
    assert s["max_abs_logprob_diff"] == pytest.approx(0.5, rel=1e-6)
    assert s["kl_k3"] == pytest.approx(float((torch.exp(r) - r - 1).mean()), rel=1e-5)
    assert s["kl_k3"] > 0  # k3 is non-negative and zero only when r == 0
    assert s["ratio_outside_frac"] == pytest.approx(1 / 5)  # only r = -0.5 leaves [log 0.8, log 1.25]


def test_padding_never_counts_and_empty_mask_gives_zeros():
    s = mismatch_stats(t([[0.0, -5.0]]), t([[0.0, 5.0]]), torch.tensor([[1, 0]]))
    assert s["max_abs_logprob_diff"] == 0.0 and s["n_tokens"] == 1
    s = mismatch_stats(t([[1.0]]), t([[2.0]]), torch.tensor([[0]]))
    assert s["n_tokens"] == 0 and s["mean_abs_logprob_diff"] == 0.0


def test_non_finite_is_counted_not_averaged():
    s = mismatch_stats(t([[-1.0, -1.0, float("-inf")]]), t([[-1.0, float("nan"), -1.0]]), torch.ones(1, 3))
    assert s["n_nonfinite"] == 2 and s["n_tokens"] == 1 and math.isfinite(s["mean_abs_logprob_diff"])


def test_p99_of_known_distribution():
    r = torch.linspace(0, 1, 10001, dtype=torch.float64)
    assert summarize_gaps(r)["p99_abs_logprob_diff"] == pytest.approx(0.99, abs=1e-4)


def test_token_truncate_caps_at_c_and_marks_clipped():
    trainer = t([[math.log(3.0), 0.0, math.log(0.5)]])
    engine = t([[0.0, 0.0, 0.0]])
    w, hit = is_weights(trainer, engine, torch.ones(1, 3), "token_truncate", 2.0)
    assert torch.allclose(w, t([[2.0, 1.0, 0.5]]))
    assert hit.tolist() == [[True, False, False]]


def test_token_mask_zeroes_above_cap():
    w, hit = is_weights(t([[math.log(3.0), math.log(1.5)]]), t([[0.0, 0.0]]), torch.ones(1, 2), "token_mask", 2.0)
    assert torch.allclose(w, t([[0.0, 1.5]])) and hit.tolist() == [[True, False]]


def test_sequence_modes_use_the_summed_log_ratio():
    trainer = t([[math.log(1.5), math.log(1.5), 5.0], [0.1, -0.1, 0.0]])
    engine = torch.zeros(2, 3)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    w, hit = is_weights(trainer, engine, mask, "sequence_truncate", 2.0)
    assert w.shape == (2, 1) and torch.allclose(w, t([[2.0], [1.0]]), atol=1e-6)  # 1.5 * 1.5 = 2.25 -> 2
    assert hit.tolist() == [[True, True, False], [False, False, False]]
    w, _ = is_weights(trainer, engine, mask, "sequence_mask", 2.0)
    assert torch.allclose(w, t([[0.0], [1.0]]), atol=1e-6)


def test_non_finite_token_gets_zero_weight():
    w, hit = is_weights(t([[0.0, float("nan")]]), t([[0.0, 0.0]]), torch.ones(1, 2), "token_truncate", 2.0)
    assert w.tolist() == [[1.0, 0.0]] and hit.tolist() == [[False, True]]


def test_unknown_mode_names_the_field():
    with pytest.raises(ValueError, match="tis_mode"):
        is_weights(t([[0.0]]), t([[0.0]]), torch.ones(1, 1), "token_clip", 2.0)


def test_ess_uniform_is_one_and_degenerate_is_small():
    assert weight_stats(torch.ones(8), torch.zeros(8))["ess"] == pytest.approx(1.0)
    w = torch.tensor([1.0] + [0.0] * 9)
    assert weight_stats(w, torch.zeros(10))["ess"] == pytest.approx(0.1)
    assert weight_stats(torch.ones(4), torch.tensor([1.0, 0, 0, 1]))["clip_frac"] == 0.5


def test_per_token_expands_sequence_weights():
    w = t([[2.0], [0.5]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert per_token(w, mask).tolist() == [2.0, 2.0, 0.5]


def test_measure_zero_gap_is_clean():
    lp = t([[-1.0, -2.0]])
    m = measure(lp, lp.clone(), torch.ones(1, 2), token_truncate)
    s = m.stats
    assert s["max_abs_logprob_diff"] == 0.0 and s["kl_k3"] == 0.0 and s["clip_frac"] == 0.0 and s["ess"] == 1.0
    assert torch.equal(m.weights, torch.ones(1, 2)) and m.keep.all()


def test_measure_drops_outside_and_non_finite_tokens_and_counts_them():
    trainer = t([[-1.0, OUTSIDE_LOGPROB, -1.0, float("nan")]])
    engine = t([[-1.5, -1.0, float("inf"), -1.0]])
    m = measure(trainer, engine, torch.tensor([[1, 1, 1, 1]]), token_truncate)
    assert m.keep.tolist() == [[True, False, False, False]]
    assert m.stats["n_outside_support"] == 1 and m.stats["n_nonfinite"] == 2 and m.stats["n_tokens"] == 1
    assert m.stats["mean_abs_logprob_diff"] == pytest.approx(0.5)
    assert torch.isfinite(m.trainer_logprobs).all() and torch.isfinite(m.engine_logprobs).all()
    assert m.weights[0, 0] == pytest.approx(math.exp(0.5))


def test_measure_gathers_over_ranks():
    # a "gather" that stands for two ranks holding the same batch: every count and statistic covers both
    lp, mask = t([[-1.0, -2.0]]), torch.ones(1, 2)
    m = measure(lp, lp - 0.1, mask, token_truncate, gather=lambda x: torch.cat([x, x]))
    assert m.stats["n_tokens"] == 4 and m.gaps.numel() == 2  # gaps: this rank's own tokens


def test_quantiles_beyond_torch_limit_use_nearest_rank():
    x = torch.arange(QUANTILE_MAX_ELEMENTS + 10, dtype=torch.float32)
    (q,) = quantiles(x, (0.5,))
    assert abs(q - x.numel() / 2) <= 1


def test_ratio_stats_before_truncation_show_a_masked_majority():
    # every token 0.1 nats apart: mean |Δ| 0.1 looks "healthy", yet with sequence_mask at cap 2 every 8-token
    # sequence (ratio e^0.8 = 2.2) is masked: the capped weights alone would only say "mean weight 0"
    trainer, engine = torch.full((4, 8), -1.0), torch.full((4, 8), -1.1)
    mask = torch.ones(4, 8)
    w, hit = is_weights(trainer, engine, mask, "sequence_mask", 2.0)
    r, _ = valid_gaps(trainer, engine, mask)
    s = ratio_stats(r, sequence_gaps(trainer, engine, mask), per_token(w, mask))
    assert s["ratio_min"] == pytest.approx(math.exp(0.1), rel=1e-5) and s["ratio_max"] == pytest.approx(math.exp(0.1),
                                                                                                       rel=1e-5)
    assert s["tokens_outside_0.5_2"] == 0.0 and s["tokens_outside_0.8_1.25"] == 0.0  # each token is fine
    assert s["seqs_outside_0.5_2"] == 1.0 and s["seqs_outside_0.8_1.25"] == 1.0      # each sequence is not
    assert s["masked_frac"] == 1.0 and weight_stats(per_token(w, mask), hit[mask.bool()])["clip_frac"] == 1.0


def test_ratio_stats_quantiles_and_empty_input():
    r = torch.linspace(-1.0, 1.0, 201, dtype=torch.float64)
    s = ratio_stats(r, r[:3], torch.ones(201))
    assert s["ratio_p1"] == pytest.approx(math.exp(-0.98), rel=1e-6) and s["ratio_p99"] == pytest.approx(math.exp(0.98))
    assert s["tokens_outside_0.8_1.25"] == pytest.approx(1 - 45 / 201, abs=1e-9)  # |r| <= log 1.25 = 0.223
    e = ratio_stats(torch.zeros(0), torch.zeros(0), torch.zeros(0))
    assert e["ratio_max"] == 1.0 and e["masked_frac"] == 0.0 and e["seqs_outside_0.5_2"] == 0.0
    assert math.isfinite(ratio_stats(torch.tensor([900.0]), torch.tensor([900.0]), torch.ones(1))["ratio_max"])


def test_nonfinite_tokens_either_side_and_only_counted_ones():
    trainer = t([[-1.0, float("nan"), -1.0, float("inf")]])
    engine = t([[float("-inf"), -1.0, -1.0, -1.0]])
    got = nonfinite_tokens(trainer, engine, torch.tensor([[1, 1, 1, 0]]))
    assert got.tolist() == [[True, True, False, False]]


def test_token_identity_walk():
    sampled = {(1, 2): [(5, 6, 0), (5, 7, 8, 0)], (9,): [(3, 4)], (9, 3, 4, 88, 89): [(10, 0)]}
    rows = [((1, 2), [5, 6, 0], [True] * 3),                                  # exact
            ((1, 2), [5, 7, 8], [True] * 3),                                  # scored up to an EOS id (8) only
            ((9,), [3, 4, 88, 89, 10, 0], [True, True, False, False, True, True])]  # tool output in between
    assert token_identity(rows, sampled, eos_ids=(0, 8)) == (0, "")
    assert token_identity(rows, sampled, eos_ids=(0,))[0] == 1  # cut where no EOS is: a dropped token
    bad, example = token_identity([((1, 2), [5, 8, 0], [True] * 3), ((4,), [1], [True])], sampled)
    assert bad == 2 and "engine sampled [5, 6, 0]" in example
    # one engine completion cannot vouch for two scored ones
    assert token_identity([((9,), [3, 4], [True] * 2), ((9,), [3, 4], [True] * 2)], {(9,): [(3, 4)]})[0] == 1
