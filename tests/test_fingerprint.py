"""The weight-sync fingerprint comparison on hand-made fingerprints (no engine needed)."""

import math

from trl_correct.fingerprint import fingerprint as _fingerprint, group_of, stale_groups


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
