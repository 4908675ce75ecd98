"""The trainer-side sampler transform (sampler.py) against vLLM's own sampler ops, on tensors.

The reference is the installed vLLM's code, called directly in its V1 order: `apply_penalties`, temperature, min_p
(MinPLogitsProcessor's three lines), `apply_top_k_top_p_pytorch` (the full-sort path vLLM CPU runs), log_softmax.
Our side avoids the full sort for top-p (candidates first), so both the candidate path and the sort fallback are
exercised. Gradients are compared with autograd through the reference.
"""

import math

import pytest
import torch
from vllm.model_executor.layers.utils import apply_penalties
from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p_pytorch

from trl_correct.core import sampler
from trl_correct.core.sampler import OUTSIDE_LOGPROB, SamplerSpec, history, token_logprobs

pytestmark = pytest.mark.unit  # builds no engine, starts no subprocess (tests/conftest.py)

V, H = 3000, 32


def vllm_logprobs(logits, spec, prompt, outputs):
    """[n, V] processed logprobs exactly as vLLM 0.31's sampler computes them; prompt/outputs: per-row token lists."""
    n = logits.size(0)
    pad = lambda rows: torch.tensor([r + [V] * (max(map(len, rows)) - len(r)) for r in rows])  # noqa: E731
    logits = apply_penalties(logits.clone(), pad(prompt), pad(outputs) if any(outputs) else torch.full((n, 1), V),
                             torch.full((n,), spec.presence_penalty), torch.full((n,), spec.frequency_penalty),
                             torch.full((n,), spec.repetition_penalty))
    z = logits / spec.temperature
    with torch.no_grad():  # vLLM's filters work in place (no autograd): take the kept set from them
        kept = z.clone()
        if spec.min_p > 0:
            probs = kept.softmax(-1)
            kept = kept.masked_fill(probs < probs.amax(-1, keepdim=True) * spec.min_p, -math.inf)
        k = torch.full((n,), spec.top_k) if spec.top_k > 0 else None
        p = torch.full((n,), spec.top_p) if spec.top_p < 1 else None
        kept = torch.isfinite(apply_top_k_top_p_pytorch(kept, k, p))
    return z.masked_fill(~kept, -math.inf).log_softmax(-1)


SPECS = {
    "temperature": SamplerSpec(temperature=0.7),
    "top_k": SamplerSpec(temperature=0.9, top_k=7),
    "top_p": SamplerSpec(temperature=0.9, top_p=0.8),
    "min_p": SamplerSpec(temperature=0.9, min_p=0.1),
    "repetition_penalty": SamplerSpec(temperature=0.9, repetition_penalty=1.4),
    "presence_penalty": SamplerSpec(temperature=0.9, presence_penalty=0.7),
    "frequency_penalty": SamplerSpec(temperature=0.9, frequency_penalty=0.5),
    "combined": SamplerSpec(temperature=0.8, top_k=50, top_p=0.9, min_p=0.02, repetition_penalty=1.2,
                            presence_penalty=0.3, frequency_penalty=0.2),
}


def case(seed, scale):
    """One sequence: prompt of 12 tokens, completion of 10; hidden states whose logits have spread `scale` (a float,
    or "mixed": rows from flat to peaked, so one chunk takes every path of the kept-set search)."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(V, H, generator=g)
    scale = torch.tensor([0.5, 1.0, 2.0, 3.0, 8.0] * 2)[:, None] if scale == "mixed" else scale
    hidden = (torch.randn(10, H, generator=g) * scale / math.sqrt(H)).requires_grad_()
    prompt = torch.randint(0, 40, (1, 12), generator=g)  # few distinct ids: penalties hit repeated tokens
    completion = torch.randint(0, 40, (1, 10), generator=g)
    return weight, hidden, prompt, completion


@pytest.mark.parametrize("scale", [1.0, 8.0, "mixed"], ids=["flat", "peaked", "mixed"])
@pytest.mark.parametrize("name", list(SPECS))
def test_matches_vllm_sampler_values_and_gradients(name, scale, monkeypatch):
    # candidate tiers of 64 and 512 over a 3000-token vocabulary: flat rows spill past both into vLLM's full sort,
    # peaked rows stay in the first tier, mixed chunks take all three paths at once
    monkeypatch.setattr(sampler, "CANDIDATE_TIERS", (64, 512))
    spec = SPECS[name]
    weight, hidden, prompt, completion = case(0, scale)
    outputs = [completion[0, :t].tolist() for t in range(10)]
    ref_all = vllm_logprobs(hidden @ weight.T, spec, [prompt[0].tolist()] * 10, outputs)
    targets = ref_all.detach().masked_fill(~torch.isfinite(ref_all.detach()), -1e9).argmax(-1)  # in support
    targets[::3] = completion[0, ::3]  # and some that may be filtered out
    ref = ref_all.gather(1, targets[:, None]).squeeze(1)
    ids, seen, counts = history(prompt, torch.ones_like(prompt), completion)
    ours, entropy, kept = token_logprobs(hidden, weight, None, targets, spec, (ids[0].expand(10, -1), seen[0],
                                                                                counts[0]))
    assert torch.equal(kept, torch.isfinite(ref)), (kept, ref)
    assert (ours[~kept] == OUTSIDE_LOGPROB).all()
    gap = (ours[kept] - ref[kept]).abs()
    assert gap.max() < 1e-5, f"max gap {gap.max():.3g}; ours {ours[:4].tolist()} vs vLLM {ref[:4].tolist()}"
    assert torch.isfinite(entropy).all() and (entropy >= -1e-6).all()
    with torch.no_grad():  # the old-policy / probe pass works in place: same numbers
        again = token_logprobs(hidden, weight, None, targets, spec, (ids[0].expand(10, -1), seen[0], counts[0]))
    assert torch.equal(again[2], kept) and (again[0] - ours).abs().max() < 1e-6 and (again[1] - entropy).abs().max() < 1e-5
    g_ours, = torch.autograd.grad(ours[kept].sum(), hidden)
    g_ref, = torch.autograd.grad(ref[kept].sum(), hidden)
    assert (g_ours - g_ref).abs().max() < 1e-4, (g_ours - g_ref).abs().max()


def test_transform_changes_logprobs_against_temperature_only():
    """The comparison above would catch a regression: scored at temperature only, every setting is far off."""
    weight, hidden, prompt, completion = case(1, 8.0)
    ids, seen, counts = history(prompt, torch.ones_like(prompt), completion)
    hist = (ids[0].expand(10, -1), seen[0], counts[0])
    targets = completion[0]
    for name, spec in SPECS.items():
        if name == "temperature":
            continue
        ours, _, kept = token_logprobs(hidden, weight, None, targets, spec, hist)
        plain, _, _ = token_logprobs(hidden, weight, None, targets, SamplerSpec(temperature=spec.temperature), hist)
        assert not kept.all() or (ours - plain).abs().max() > 1e-3, name  # filtered out, or moved


def test_history_is_what_vllm_sees_at_each_position():
    prompt = torch.tensor([[0, 5, 6]])  # 0 is left padding
    mask = torch.tensor([[0, 1, 1]])
    completion = torch.tensor([[7, 5, 7]])
    ids, seen, counts = history(prompt, mask, completion)
    col = {int(t): i for i, t in enumerate(ids[0])}
    assert seen[0, 0, col[5]] and seen[0, 0, col[6]] and not seen[0, 0, col[7]]  # prompt only at t=0
    assert counts[0, 0].sum() == 0 and counts[0, 1, col[7]] == 1 and counts[0, 2, col[5]] == 1
    assert counts[0, 2, col[7]] == 1 and 0 not in col  # padding is no history


def test_repetition_penalty_by_hand():
    weight = torch.eye(3)
    hidden = torch.tensor([[2.0, -1.0, 0.5]])
    spec = SamplerSpec(repetition_penalty=2.0)
    hist = (torch.tensor([[0, 1]]), torch.tensor([[True, True]]), torch.zeros(1, 2))
    lp, _, _ = token_logprobs(hidden, weight, None, torch.tensor([2]), spec, hist)
    expected = torch.tensor([1.0, -2.0, 0.5]).log_softmax(-1)[2]  # positive logits divided, negative multiplied
    assert abs(lp.item() - expected.item()) < 1e-6


def test_empty_input():
    lp, ent, kept = token_logprobs(torch.zeros(0, H), torch.randn(V, H), None, torch.zeros(0, dtype=torch.long),
                                   SPECS["combined"])
    assert lp.numel() == ent.numel() == kept.numel() == 0


def test_unverified_vllm_release_is_not_guessed():
    from types import SimpleNamespace

    from trl_correct.adapters.engine import sampler_order
    from trl_correct.adapters.head import why_unreproducible

    assert sampler_order("0.33.0") == sampler_order("0.31.0") == sampler_order("0.26.0") == SPECS["combined"].order
    model = SimpleNamespace(config=SimpleNamespace(get_text_config=lambda: SimpleNamespace()))
    future = SamplerSpec(top_k=5, order=sampler_order("0.40.0"))
    assert "not the one sampler.py implements" in why_unreproducible(model, future)
    assert why_unreproducible(model, SamplerSpec(temperature=0.7, order=sampler_order("0.40.0"))) is None  # T only: TRL's
    capped = SimpleNamespace(config=SimpleNamespace(get_text_config=lambda: SimpleNamespace(final_logit_softcapping=30.0)))
    assert "final_logit_softcapping" in why_unreproducible(capped, SPECS["top_k"])
