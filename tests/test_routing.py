"""Mixture-of-experts routing (issue 25 items 2, 3, 5): the engine's routing captured in-process, the trainer's routers
recorded and replayed (R3), the routing check, and the MoE faults each named by its own cause.

Unit (no engine): the flip figures on hand-made rows; the trainer's router taps on tiny MoE models built here from a
config (Qwen3-MoE, Mixtral): recorded top-k equal the routers' own, sequences found by their tokens whatever the
padding, replaying a model's own routing changes nothing, a forced routing is what the forward computes with while
the gradient reaches the router, uncovered tokens keep their own experts; the routing check's rule; StepRecord's
routing metrics.

Engine (one tiny MoE engine or trainer at a time): every family's rollout routing, captured while vLLM generated,
equals the HF router's top-k under teacher forcing in fp32 at every computed position, as does the engine's own
teacher-forced routing; the capture's bookkeeping is timed. The MoE faults on tiny Qwen3-MoE: expert_not_synced and
router_stale_on_engine are named by weight_sync (the expert by layer and index), replay_wrong_tokens by routing.

Figures: `.venv/bin/python -m pytest -q -s tests/test_routing.py | grep '^routing '`.
"""

import pytest
import torch

from trl_correct.adapters.routing import NO_EXPERT, RouterTaps, align, unknown_routers
from trl_correct.core.checks import ROUTING_MINIMUMS, routing_check, routing_threshold
from trl_correct.core.numerics import routing_flips
from trl_correct.core.records import RATIO_KEYS, MismatchStats, StepRecord


# -- unit: figures and the check --------------------------------------------------------------------------------------
@pytest.mark.unit
def test_routing_flips_counts_sets_not_order_and_skips_missing_rows():
    a = torch.tensor([[[0, 1], [2, 3]], [[1, 0], [4, 5]], [[6, 7], [NO_EXPERT, NO_EXPERT]]])  # [3 tokens, 2 layers, 2]
    b = torch.tensor([[[1, 0], [2, 3]], [[0, 1], [4, 6]], [[6, 5], [1, 2]]])
    f = routing_flips([a], [b])
    # token 0: same sets; token 1: layer 1 differs; token 2: layer 0 differs, layer 1 not routed on side a
    assert f == {"flip_frac_token_layer": 2 / 5, "flip_frac_token": 2 / 3, "n_token_layers": 5, "n_tokens": 3}
    assert routing_flips([a, None], [a, b])["flip_frac_token_layer"] == 0.0
    assert routing_flips([], [])["n_tokens"] == 0


@pytest.mark.unit
def test_routing_check_rule_and_replay():
    fig = dict(flip_frac_token_layer=0.03, flip_frac_token=0.06, n_token_layers=1000, n_tokens=500)
    floor = dict(flip_frac_token_layer=0.01, flip_frac_token=0.02, n_token_layers=1000, n_tokens=500)
    assert routing_threshold(floor, "bfloat16")[0] == ROUTING_MINIMUMS["bfloat16"]  # 4 x 0.01 under the minimum
    assert routing_threshold(dict(floor, flip_frac_token_layer=0.02), "bfloat16")[0] == pytest.approx(0.08)
    assert routing_threshold(None, "float32")[0] == ROUTING_MINIMUMS["float32"]
    assert routing_check(fig, floor, "bfloat16").passed
    bad = routing_check(dict(fig, flip_frac_token_layer=0.3), floor, "bfloat16")
    assert not bad.passed and bad.name == "routing" and "routing_replay: true" in bad.fix
    assert "stale router" in bad.fix and bad.measured["flip_frac_token_layer"] == 0.3
    # replay on: the flips are the routers' own business; the experts used must be the engine's
    on = dict(fig, flip_frac_token_layer=0.3, replay=dict(flip_frac_token_layer=0.0, flip_frac_token=0.0,
                                                         n_token_layers=1000, n_tokens=500),
              mismatch_without_replay={"mean_abs_logprob_diff": 0.01}, mismatch_with_replay={"mean_abs_logprob_diff":
                                                                                             0.002})
    good = routing_check(on, floor, "bfloat16")
    assert good.passed and "0.01 without replay, 0.002 with" in good.detail
    off = routing_check(dict(on, replay=dict(on["replay"], flip_frac_token_layer=0.4)), floor, "bfloat16")
    assert not off.passed and "not aligned" in off.fix


@pytest.mark.unit
def test_step_record_carries_routing_metrics():
    routing = dict(flip_frac_token_layer=0.02, flip_frac_token=0.05, n_token_layers=400, n_tokens=200)
    ratios = {k: 1.0 for k in RATIO_KEYS}
    stats = MismatchStats(n_tokens=10, ratios=ratios, routing=routing)
    assert stats.to_dict()["routing"] == routing and "routing" not in MismatchStats(n_tokens=10).to_dict()
    r = StepRecord.of(3, stats, True, True)
    assert r.routing == routing and StepRecord.from_dict(r.to_dict()) == r
    logged = dict(r.metrics_to_log())
    assert logged["correct/routing/flip_frac_token_layer"] == 0.02 and logged["correct/routing/flip_frac_token"] == 0.05
    dense = StepRecord.of(3, MismatchStats(n_tokens=10, ratios=ratios), True, True)
    assert "routing" not in dense.to_dict() and not any("routing" in k for k, _ in dense.metrics_to_log())


@pytest.mark.unit
def test_certificate_run_summary_has_the_routing_quantiles_and_validates():
    import jsonschema

    from trl_correct import certificate

    steps = [dict(step=i, tis_enabled=True, gate_passed=True, mean_abs_logprob_diff=0.01, p99_abs_logprob_diff=0.02,
                  max_abs_logprob_diff=0.03, kl_k3=1e-4,
                  routing=dict(flip_frac_token_layer=0.01 * i, flip_frac_token=0.02 * i, n_token_layers=100,
                               n_tokens=50, replay=dict(flip_frac_token_layer=0.0, flip_frac_token=0.0,
                                                        n_token_layers=100, n_tokens=50))) for i in range(3)]
    run = certificate.run_summary(steps, [], [])
    assert run["routing"]["flip_frac_token_layer"]["max"] == 0.02
    assert run["routing"]["replay_flip_frac_token_layer"]["max"] == 0.0
    jsonschema.Draft202012Validator(certificate.schema()["properties"]["run"]).validate(run)
    dense = certificate.run_summary([{k: v for k, v in x.items() if k != "routing"} for x in steps], [], [])
    assert "routing" not in dense
    assert "routing_replay" in certificate.CONFIG_FIELDS


# -- unit: the trainer's routers ---------------------------------------------------------------------------------------
def tiny_moe(family: str, seed: int = 0):
    from transformers import MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    common = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                  head_dim=16, num_experts_per_tok=2, max_position_embeddings=64)
    if family == "mixtral":
        model = MixtralForCausalLM(MixtralConfig(**common, intermediate_size=16, num_local_experts=6))
    else:
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**common, intermediate_size=32, moe_intermediate_size=16,
                                                   num_experts=6, norm_topk_prob=True))
    for name, p in model.named_parameters():  # the init leaves the routers at 0: every token a tie
        if name.endswith("mlp.gate.weight"):
            torch.nn.init.normal_(p, std=0.5)
    return model.eval()


def _router_outputs(model):
    got = {}
    hooks = [m.register_forward_hook(lambda m, i, o, layer=int(n.split(".")[2]): got.__setitem__(layer, o[2]))
             for n, m in model.named_modules() if n.endswith("mlp.gate")]
    return got, hooks


def _batch(seqs, width=None, pad=0):
    """Left-padded rows (as TRL lays prompt + completion out when every completion fills its row)."""
    width = width or max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):], mask[i, width - len(s):] = torch.tensor(s), 1
    return ids, mask


SEQS = [[5, 9, 13, 2, 7, 7, 30], [40, 41, 42], [5, 9, 13, 2, 8, 61, 3, 3, 1]]


@pytest.mark.unit
@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_taps_record_each_token_and_find_it_by_content(family):
    model = tiny_moe(family)
    taps = RouterTaps.of(model)
    assert taps.layers == (0, 1) and taps.top_k == 2 and RouterTaps.of(torch.nn.Linear(2, 2)) is None
    assert unknown_routers(model) == []
    ids, mask = _batch(SEQS)
    got, hooks = _router_outputs(model)
    with torch.no_grad(), taps.recording() as records:
        model(input_ids=ids, attention_mask=mask)
    for h in hooks:
        h.remove()
    own = [o for o, _ in taps.routing_of(records, SEQS)]
    for i, s in enumerate(SEQS):
        first = ids.shape[1] - len(s)
        for c, layer in enumerate(taps.layers):
            hf = got[layer].view(len(SEQS), ids.shape[1], -1)[i, first:]
            assert torch.equal(own[i][:, c].long(), hf), (family, i, layer)
    assert taps.routing_of(records, [[1, 2, 3]]) == [(None, None)] and taps.recent == []
    with torch.no_grad():  # outside a recording: kept in `recent`
        model(input_ids=ids, attention_mask=mask)
    assert len(taps.take_recent()) == 1 and taps.recent == []
    taps.close()


def _logits_and_used(model, taps, ids, mask, store=None):
    with torch.no_grad(), taps.recording() as records:
        if store is not None:
            with taps.replaying(store, taps.layers):
                out = model(input_ids=ids, attention_mask=mask).logits
        else:
            out = model(input_ids=ids, attention_mask=mask).logits
    return out, records


@pytest.mark.unit
@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_replaying_the_models_own_routing_changes_nothing(family):
    model = tiny_moe(family)
    taps = RouterTaps.of(model)
    taps.replay = True
    ids, mask = _batch(SEQS)
    plain, records = _logits_and_used(model, taps, ids, mask)
    store = {tuple(s): o for s, (o, _) in zip(SEQS, taps.routing_of(records, SEQS))}
    replayed, records = _logits_and_used(model, taps, ids, mask, store)
    assert torch.equal(plain, replayed), (plain - replayed).abs().max()
    for s, (own, used) in zip(SEQS, taps.routing_of(records, SEQS)):
        assert torch.equal(own, used) and torch.equal(used, store[tuple(s)])
    taps.close()


@pytest.mark.unit
@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_replay_forces_the_experts_and_the_gradient_reaches_the_router(family):
    model = tiny_moe(family)
    taps = RouterTaps.of(model)
    taps.replay = True
    ids, mask = _batch(SEQS)
    plain, records = _logits_and_used(model, taps, ids, mask)
    own = {tuple(s): o for s, (o, _) in zip(SEQS, taps.routing_of(records, SEQS))}
    # the engine's routing: experts (4, 5) everywhere for the first sequence, except its last token (not routed)
    forced = own[tuple(SEQS[0])].clone()
    forced[:] = torch.tensor([4, 5], dtype=forced.dtype)
    forced[-1] = NO_EXPERT
    store = {tuple(SEQS[0]): forced}
    replayed, records = _logits_and_used(model, taps, ids, mask, store)
    (own0, used0), (own1, used1) = taps.routing_of(records, SEQS[:2])
    assert torch.equal(used0[:-1], forced[:-1]) and torch.equal(used0[-1], own0[-1])  # uncovered: its own experts
    assert torch.equal(used1, own1)  # a sequence the store does not know keeps its own routing
    # the other rows compute as before (to rounding: the experts' grouped matmuls see other token groups)
    assert not torch.allclose(plain[0], replayed[0], atol=1e-4) and torch.allclose(plain[1], replayed[1], atol=1e-5)
    # with gradients (TRL's loss forward): the replayed experts' weights come from the router's probabilities
    model.zero_grad()
    with taps.replaying(store, taps.layers):
        loss = model(input_ids=ids[:1], attention_mask=mask[:1]).logits.float().logsumexp(-1).sum()
    loss.backward()
    router = model.model.layers[1].mlp.gate.weight
    assert router.grad is not None and bool(router.grad[4:].abs().sum() > 0)
    taps.close()


@pytest.mark.unit
def test_policy_side_taps_moe_routers_and_refuses_replay_without_them():
    from types import SimpleNamespace

    from trl_correct.adapters.policy import PolicySide
    from trl_correct.errors import ConfigError

    def trainer(model, replay):
        return SimpleNamespace(model=model, args=SimpleNamespace(routing_replay=replay),
                               accelerator=SimpleNamespace(unwrap_model=lambda m: m))

    moe = tiny_moe("qwen3_moe")
    side = PolicySide(trainer(moe, True))
    assert side.routing is not None and side.routing.replay and side.routing.layers == (0, 1)
    with side.without_replay():
        assert not side.routing.replay
    assert side.routing.replay
    side.routing.close()
    assert PolicySide(trainer(torch.nn.Linear(2, 2), False)).routing is None  # dense: no hook
    with pytest.raises(ConfigError, match="routing_replay=True is invalid for this model: it has no mixture-of-experts"):
        PolicySide(trainer(torch.nn.Linear(2, 2), True))


@pytest.mark.unit
def test_replay_rows_match_by_content_and_align_layers():
    model = tiny_moe("qwen3_moe")
    taps = RouterTaps.of(model)
    rows = torch.arange(len(SEQS[0]) * 2 * 2, dtype=torch.int16).view(len(SEQS[0]), 2, 2) % 6
    taps.sources = [lambda: ({tuple(SEQS[0]): rows.flip(1)}, (1, 0))]  # the store's layers in another order
    n = len(SEQS[0])
    ids, mask = _batch([SEQS[0] + [63], SEQS[1], SEQS[0][:-1] + [62]], width=12)  # longer; unknown; differs at the end
    out = taps.replay_rows(ids, mask)
    first = 12 - n - 1
    assert torch.equal(out[0, first:first + n], rows) and bool((out[0, first + n:] == NO_EXPERT).all())
    assert bool((out[1:] == NO_EXPERT).all()) and bool((out[0, :first] == NO_EXPERT).all())
    assert torch.equal(align(rows, (0, 1), (1, 2))[:, 0], rows[:, 1])
    assert bool((align(rows, (0, 1), (1, 2))[:, 1] == NO_EXPERT).all())
    taps.close()


# -- the real engine ----------------------------------------------------------------------------------------------------
from trl_correct.tasks.tiny import MOE_FAMILIES, tiny_family_dir  # noqa: E402

PROMPTS = [[5, 17, 99, 300, 41, 7, 8, 9, 10, 11, 12, 13], [5, 17, 99], [400, 401, 402, 403, 404]]


@pytest.mark.parametrize("family", list(MOE_FAMILIES))
def test_engine_routing_is_the_routers_own(family):
    """fp32: the rollout's routing (captured while vLLM generated) and the engine's teacher-forced routing both equal
    the HF router's top-k on prompt + completion, at every position but the last (never fed to the engine)."""
    import gc

    from transformers import AutoModelForCausalLM

    from trl_correct.adapters.engine import Engine, EngineSettings

    path = str(tiny_family_dir(family))
    engine = Engine(EngineSettings(model=path, dtype="float32", max_model_len=256, max_num_seqs=8))
    try:
        assert engine.routing_layers == (0, 1) and engine.routing_unavailable is None, engine.routing_unavailable
        ids, _ = engine.sample(PROMPTS, max_tokens=8, temperature=1.0, seed=3)
        rollout, seconds = engine.last_routing, engine.routing_seconds
        forced = engine.routed_experts(PROMPTS, ids)
    finally:
        engine.close()
        gc.collect()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    taps = RouterTaps.of(model)
    seqs = [p + c for p, c in zip(PROMPTS, ids)]
    with torch.no_grad(), taps.recording() as records:
        for s in seqs:
            model(input_ids=torch.tensor([s]))
    own = [o for o, _ in taps.routing_of(records, seqs)]
    n = sum(len(s) for s in seqs)
    for s, r, f, o in zip(seqs, rollout, forced, own):
        assert r.shape == (len(s), 2, 2) and bool((r[:-1] >= 0).all()) and bool((r[-1] == NO_EXPERT).all())
        assert bool((f >= 0).all())
    assert routing_flips(rollout, own)["flip_frac_token_layer"] == 0.0
    assert routing_flips(forced, own) == dict(flip_frac_token_layer=0.0, flip_frac_token=0.0, n_token_layers=2 * n,
                                               n_tokens=n)
    print(f"\nrouting {family} fp32 rollout_vs_hf=0 flips teacher_forced_vs_hf=0 flips over {n} tokens "
          f"capture_bookkeeping={seconds * 1e3:.1f} ms")


MOE_FAULT_FAMILY = "qwen3_moe"


@pytest.mark.parametrize("fault,replay", [("expert_not_synced", False), ("router_stale_on_engine", False),
                                          ("replay_wrong_tokens", True)])
def test_moe_fault_is_named_by_its_cause(make_trainer, fault, replay):
    from trl_correct.testing.faults import FAULTS, run_with_faults

    trainer = make_trainer(model=str(tiny_family_dir(MOE_FAULT_FAMILY)), routing_replay=replay)
    run = run_with_faults(trainer, [fault], trainer.engine.settings)
    report = run.report
    print(f"\nrouting fault {fault}: causes={report.causes}\n{report.table()}")
    assert FAULTS[fault].cause in report.causes, report.table()
    if fault == "expert_not_synced":
        sync = report.check("weight_sync")
        assert "model.layers.1.mlp.experts.3.*.weight" in sync.detail, sync.detail
    if fault == "router_stale_on_engine":
        assert "model.layers.1.mlp.*.weight" in report.check("weight_sync").detail
    if fault == "replay_wrong_tokens":
        assert "replay on" in report.check("routing").detail


def test_replay_trains_at_the_fp32_floor(make_trainer):
    """routing_replay on, fp32, 3 GRPO steps: TRL's scoring and its loss forwards both replay the engine's experts
    (counted on the taps), every batch's replayed experts are the engine's, and the logprobs stay at the fp32 floor
    (in fp32 the routers agree, so replay must change nothing)."""
    from conftest import train_and_measure

    trainer = make_trainer(model=str(tiny_family_dir(MOE_FAULT_FAMILY)), routing_replay=True, max_steps=3)
    taps = trainer.gate.policy.routing
    moved, gaps = train_and_measure(trainer)
    report = trainer.gate_report
    routing = [r.routing for r in trainer.step_records]
    print(f"\nrouting replay train: gate {report.passed} counts={taps.counts} step_max={gaps} "
          f"steps={[(x['flip_frac_token_layer'], x['replay']['flip_frac_token_layer']) for x in routing]}")
    assert report.passed and report.check("routing").passed, report.table()
    assert "replay" in report.mismatch["routing"] and report.mismatch["routing"]["replay"]["n_token_layers"] > 0
    assert taps.counts["replayed_no_grad"] >= 3 and taps.counts["replayed_grad"] >= 3, taps.counts
    assert all(x["replay"]["flip_frac_token_layer"] == 0 and x["replay"]["n_token_layers"] > 0 for x in routing)
    assert len(gaps) == 3 and max(gaps) < 1e-4 and moved > 100 * max(gaps), (gaps, moved)
