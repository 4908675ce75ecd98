"""The weight-sync fingerprint comparison on hand-made fingerprints (no engine needed)."""

import math

import pytest

from trl_correct.adapters.fingerprint import fingerprint as _fingerprint, group_of, stale_groups

pytestmark = pytest.mark.unit  # builds no engine, starts no subprocess (tests/conftest.py)


def test_fused_layouts_share_a_group():
    assert group_of("model.layers.0.self_attn.q_proj.weight") == group_of("model.layers.0.self_attn.qkv_proj.weight")
    assert group_of("model.layers.0.mlp.gate_proj.weight") == group_of("model.layers.0.mlp.gate_up_proj.weight")
    assert group_of("model.layers.0.mlp.up_proj.bias") != group_of("model.layers.0.mlp.up_proj.weight")


def test_concatenated_tensors_fingerprint_like_their_parts():
    import torch

    q, k = torch.randn(8, 4), torch.randn(2, 4)
    parts = _fingerprint([("l.attn.q_proj.weight", q), ("l.attn.k_proj.weight", k)])
    fused = _fingerprint([("l.attn.qkv_proj.weight", torch.cat([q, k]))])
    assert stale_groups(fused, parts) == []
    moved = _fingerprint([("l.attn.qkv_proj.weight", torch.cat([q, k + 1e-6]))])
    assert stale_groups(moved, parts) == ["l.attn.*.weight"]


def test_fingerprint_is_exact_and_blind_to_layout_only():
    import torch

    w = torch.randn(6, 4)
    assert _fingerprint([("l.o_proj.weight", w)]) == _fingerprint([("l.o_proj.weight", w.t())])  # read back as W^T
    nudged = w.clone()
    nudged[3, 2] = torch.nextafter(nudged[3, 2], torch.tensor(math.inf))  # one ulp of one element
    assert stale_groups(_fingerprint([("l.o_proj.weight", nudged)]), _fingerprint([("l.o_proj.weight", w)]))
    as_bf16 = _fingerprint([("l.o_proj.weight", w)], {"l.*.weight": torch.bfloat16})  # cast as the engine stores it
    assert as_bf16 == _fingerprint([("l.o_proj.weight", w.bfloat16())])
    signed = torch.tensor([[-0.0, 1.0]])
    assert stale_groups(_fingerprint([("l.o_proj.weight", signed)]), _fingerprint([("l.o_proj.weight", signed.abs())]))
    zero_signs = frozenset({"l.*.weight"})  # packed layers: the identity read-back cannot show a zero's sign
    assert _fingerprint([("l.o_proj.weight", signed)], None, zero_signs) == _fingerprint(
        [("l.o_proj.weight", signed.abs())], None, zero_signs)


def test_changed_group_is_stale_and_one_sided_groups_are_named():
    expected = {"a.*.weight": [1, 2], "b.*.weight": [3, 4]}
    got = {"a.*.weight": [7, 2], "c.*.weight": [5, 6], "b.*.weight": [3, 4]}
    assert stale_groups(got, expected) == ["a.*.weight", "c.*.weight (never sent)"]
    assert stale_groups({}, {"d.*.bias": [0, 8]}) == []  # an all-zero tensor the engine does not keep
    assert stale_groups({}, {"d.*.weight": [1, 8]}) == ["d.*.weight (not in engine)"]


# -- tensor parallelism: each rank's slice, cut as vLLM's loaders cut it ---------------------------------------------
def _shards(name, t, parts_per_rank, packed=None):
    from trl_correct.adapters.fingerprint import shard_of

    return [shard_of(name, t, parts, packed or {}) for parts in parts_per_rank]


def test_tp_slices_partition_each_tensor_and_replicate_what_vllm_replicates():
    import torch

    tp, hidden = 2, 8
    w = torch.arange(16 * hidden, dtype=torch.float32).reshape(16, hidden)
    mlp = "model.layers.0.mlp"
    packed = {"gate_up_proj": ["gate_proj", "up_proj"]}
    # merged column-parallel: each of gate and up is cut along dim 0, rank r keeps its half of each
    parts = [{f"{mlp}.gate_up_proj": dict(kind="rows", rank=r, size=tp, sizes=[16, 16])} for r in range(tp)]
    gate = _shards(f"{mlp}.gate_proj.weight", w, parts, packed)
    assert [g.shape[0] for g in gate] == [8, 8] and torch.equal(torch.cat(gate), w)
    # the same weights stored fused in the checkpoint (Phi-3's gate_up_proj): the same halves of each part
    fused = _shards(f"{mlp}.gate_up_proj.weight", torch.cat([w, -w]), parts)
    assert torch.equal(fused[0], torch.cat([w[:8], -w[:8]])) and torch.equal(fused[1], torch.cat([w[8:], -w[8:]]))
    # row-parallel: dim 1, the bias whole on every rank
    parts = [{f"{mlp}.down_proj": dict(kind="cols", rank=r, size=tp)} for r in range(tp)]
    down = _shards(f"{mlp}.down_proj.weight", w, parts)
    assert torch.equal(torch.cat(down, 1), w)
    assert all(torch.equal(b, w[0]) for b in _shards(f"{mlp}.down_proj.bias", w[0], parts))
    # a module without a partition (a norm) is held whole
    assert all(torch.equal(x, w[0]) for x in _shards("model.layers.0.input_layernorm.weight", w[0], parts))


def test_tp_qkv_splits_q_and_replicates_a_kv_head_held_by_several_ranks():
    import torch

    attn, head = "model.layers.0.self_attn", 4
    q, k = torch.randn(2 * head, 8), torch.randn(1 * head, 8)  # 2 heads, 1 KV head, TP 2: the KV head on both ranks
    packed = {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}
    parts = [{f"{attn}.qkv_proj": dict(kind="qkv", rank=r, size=2, q=head, kv=head, v=head, kv_rank=r // 2,
                                       total=[2 * head, head, head])} for r in range(2)]
    qs = _shards(f"{attn}.q_proj.weight", q, parts, packed)
    ks = _shards(f"{attn}.k_proj.weight", k, parts, packed)
    assert torch.equal(torch.cat(qs), q) and all(torch.equal(x, k) for x in ks)
    # fused in the checkpoint (q, k, v stacked): each rank gets its q rows and the replicated k and v
    v = torch.randn(head, 8)
    fused = _shards(f"{attn}.qkv_proj.weight", torch.cat([q, k, v]), parts)
    assert torch.equal(fused[1], torch.cat([q[head:], k, v]))


def test_tp_vocab_rows_are_padded_with_zeros_as_vllm_pads_them():
    import torch

    emb = torch.randn(10, 4)
    parts = [{"model.embed_tokens": dict(kind="vocab", start=0, end=6, padded=6)},
             {"model.embed_tokens": dict(kind="vocab", start=6, end=10, padded=6)}]
    a, b = _shards("model.embed_tokens.weight", emb, parts)
    assert torch.equal(a, emb[:6]) and torch.equal(b[:4], emb[6:]) and b.shape == (6, 4) and not b[4:].any()
    # a padded shard's fingerprint: the same checksum as its rows, counted with the padding the engine holds
    assert _fingerprint([("e", b)])["e"][0] == _fingerprint([("e", emb[6:])])["e"][0]
