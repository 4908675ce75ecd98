"""The weight-sync fingerprint comparison on hand-made fingerprints (no engine needed)."""

import math

from trl_correct.engine import _fingerprint, group_of, stale_groups


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


def test_nan_fingerprint_is_stale_and_one_sided_groups_are_named():
    expected = {"a.*.weight": [1.0, 2.0], "b.*.weight": [3.0, 4.0]}
    got = {"a.*.weight": [math.nan, math.nan], "c.*.weight": [5.0, 6.0], "b.*.weight": [3.0, 4.0]}
    assert stale_groups(got, expected) == ["a.*.weight", "c.*.weight (never sent)"]
    assert stale_groups({}, {"d.*.bias": [0.0, 0.0]}) == []  # an all-zero tensor the engine does not keep
    assert stale_groups({}, {"d.*.weight": [1.0, 1.0]}) == ["d.*.weight (not in engine)"]
