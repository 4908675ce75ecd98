"""The engine's sampler transform reproduced on the trainer's side: per-token log-probabilities under exactly the
distribution the engine sampled from (vLLM's `processed_logprobs`).

Pure torch; knows nothing of vLLM or TRL. The engine adapter (engine.py) says which order the installed vLLM applies
the transforms in (`SamplerSpec.order`); the trainer (head.py) feeds hidden states and token histories in.

vLLM V1 (0.26-0.33, read from vllm/v1/sample/sampler.py): logits in fp32 -> penalties (repetition over prompt and
output tokens, frequency and presence over output tokens) -> divide by temperature -> min_p -> top_k -> top_p ->
log_softmax over the kept tokens. A token outside the kept set has logprob -inf on the engine side; here it gets
`OUTSIDE_LOGPROB` (finite, so a loss never turns NaN) and is reported by `in_support`.
"""

import math
from dataclasses import asdict, dataclass, fields

import torch
from torch.utils.checkpoint import checkpoint

VLLM_V1_ORDER = ("penalties", "temperature", "min_p", "top_k", "top_p")
OUTSIDE_LOGPROB = -1e4  # far below any real logprob (log(1/150k) = -11.9); exp() of it is exactly 0 in fp32
# The filters look for the kept set among each row's m largest logits, m in these tiers, before sorting a whole row
# (what vLLM does). Vocab 151,936 on 2 CPU cores, 512 rows: topk 1024 0.28 s, 8192 0.57 s, full sort 5.9 s. Random
# logits of std 4.4 (flatter than a trained model's) gave a 0.95-nucleus median of 741 tokens, 24 % of rows over 1024.
CANDIDATE_TIERS = (1024, 8192)
CHUNK_BYTES = 256 * 2**20  # logits materialised per chunk of tokens


@dataclass(frozen=True)
class SamplerSpec:
    """What the engine does to the logits before sampling; neutral values mean 'off'."""

    temperature: float = 1.0
    top_k: int = 0  # 0 or -1: off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    order: tuple = VLLM_V1_ORDER

    @property
    def transforms(self) -> list[str]:
        """The settings other than temperature that change the distribution."""
        return [k for k in SAMPLER_FIELDS if k != "temperature" and not is_off(k, getattr(self, k))]

    @property
    def needs_history(self) -> bool:
        return any(t.endswith("penalty") for t in self.transforms)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["order"] = list(self.order)
        return d

    def settings(self) -> dict:
        """{field: value} of the sampler fields (SAMPLER_FIELDS), without the order."""
        return {k: getattr(self, k) for k in SAMPLER_FIELDS}


# The sampler's field names and their neutral ("off") values, once: config, gate and engine derive theirs from these.
SAMPLER_FIELDS = tuple(f.name for f in fields(SamplerSpec) if f.name != "order")
NEUTRAL = {f.name: f.default for f in fields(SamplerSpec) if f.name != "order"}


def normalized(name: str, value):
    """A sampler value in one spelling, so that settings meaning 'off' compare equal (top_k 0 / -1 / None, min_p
    None / 0); None is the neutral value."""
    if value is None:
        value = NEUTRAL[name]
    if name == "top_k":
        return max(int(value), 0)
    return float(value)


def is_off(name: str, value) -> bool:
    """`value` leaves the distribution unchanged (for temperature: 1)."""
    return normalized(name, value) == normalized(name, None)


def history(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor):
    """Penalty inputs per completion position, as vLLM sees them when it samples that position.

    Args: prompt_ids / prompt_mask [B, P] (mask 1 = real token), completion_ids [B, T].
    Returns (ids [B, U], in_prompt_or_output [B, T, U] bool, output_counts [B, T, U] float): `ids` are the distinct
    tokens of each sequence (padded by repeating the first); at position t the output history is completion[:t].
    """
    B, T = completion_ids.shape
    rows = []
    for b in range(B):
        p = prompt_ids[b][prompt_mask[b].bool()]
        rows.append(torch.unique(torch.cat([p, completion_ids[b]])))
    U = max(len(r) for r in rows)
    ids = torch.stack([torch.cat([r, r[:1].expand(U - len(r))]) for r in rows])  # [B, U]
    in_prompt = torch.stack([torch.isin(ids[b], prompt_ids[b][prompt_mask[b].bool()]) for b in range(B)])  # [B, U]
    hit = (completion_ids[:, :, None] == ids[:, None, :]).float()  # [B, T, U]: completion token t is ids[u]
    counts = torch.cumsum(hit, dim=1) - hit  # occurrences in completion[:t]
    return ids, in_prompt[:, None, :] | (counts > 0), counts


def _apply_penalties(logits, spec: SamplerSpec, ids, seen, counts, inplace: bool = False):
    """vLLM's penalties on the history tokens only (every other logit is unchanged). logits [n, V]; ids/seen/counts
    [n, U]. Out of place (differentiable) unless `inplace`."""
    vals = logits.gather(1, ids)
    if spec.repetition_penalty != 1.0:
        pen = torch.where(seen, torch.full_like(vals, spec.repetition_penalty), torch.ones_like(vals))
        vals = vals * torch.where(vals > 0, 1.0 / pen, pen)  # vLLM multiplies by 1/penalty for positive logits
    vals = vals - spec.frequency_penalty * counts - spec.presence_penalty * (counts > 0).float()
    return logits.scatter_(1, ids, vals) if inplace else logits.scatter(1, ids, vals)


@torch.no_grad()
def _candidates(z: torch.Tensor, spec: SamplerSpec, m: int):
    """The tokens vLLM keeps after min_p, top_k and top_p, looked for among each row's m largest logits.

    z [n, V]: temperature-scaled logits. Returns (idx [n, m], keep [n, m], spilled [n]); `spilled` rows have kept
    tokens beyond the candidates (a nucleus or min_p set wider than m) and need a larger m or `_kept_full`.
    min_p: p_i >= min_p * p_max  <=>  z_i >= z_max + log(min_p).
    """
    n, V = z.shape
    k = spec.top_k if 0 < (spec.top_k or 0) < V else 0
    m = min(V, max(k, m))
    vals, idx = z.topk(m, dim=-1)  # descending
    zmax = vals[:, :1]
    thr = zmax + math.log(spec.min_p) if spec.min_p > 0.0 else torch.full_like(zmax, -math.inf)
    if k:
        thr = torch.maximum(thr, vals[:, k - 1:k])
    alive = vals >= thr
    no_spill = torch.zeros(n, dtype=torch.bool, device=z.device)
    if spec.top_p >= 1.0:  # kept = survivors of min_p / top_k
        return idx, alive, alive[:, -1] if m < V and not k else no_spill
    cand = torch.where(alive, torch.exp(vals - zmax), torch.zeros_like(vals))
    if k:  # every survivor is a candidate
        total = cand.sum(-1, keepdim=True)
    elif spec.min_p > 0.0 and not bool(alive[:, -1].any()):  # every min_p survivor is a candidate
        total = cand.sum(-1, keepdim=True)
    elif spec.min_p > 0.0:
        total = torch.where(z >= thr, torch.exp(z - zmax), torch.zeros_like(z)).sum(-1, keepdim=True)
    else:
        total = torch.exp(torch.logsumexp(z, dim=-1, keepdim=True) - zmax)
    rest = (total - cand.sum(-1, keepdim=True)).clamp(min=0)  # mass of surviving tokens outside the candidates
    asc = torch.cumsum(cand.flip(-1), dim=-1).flip(-1)  # mass of candidates at or below each one
    cum = (rest + asc) / total  # vLLM's ascending cumulative probability at each candidate
    keep = alive & (cum > 1 - spec.top_p)
    keep[:, 0] = True
    return idx, keep, keep[:, -1] if m < V else no_spill  # the smallest candidate kept: the set may go on


@torch.no_grad()
def _kept_full(z: torch.Tensor, spec: SamplerSpec) -> torch.Tensor:
    """[n, V] keep mask by vLLM's own path (sort the whole row), for rows whose kept set spills past the candidates."""
    V = z.size(-1)
    keep = torch.ones_like(z, dtype=torch.bool)
    if spec.min_p > 0.0:
        keep &= z >= z.amax(-1, keepdim=True) + math.log(spec.min_p)
    if 0 < (spec.top_k or 0) < V:
        keep &= z >= z.topk(spec.top_k, dim=-1).values[:, -1:]
    if spec.top_p < 1.0:
        zs, order = torch.where(keep, z, torch.full_like(z, -math.inf)).sort(dim=-1)
        drop = zs.softmax(dim=-1).cumsum(dim=-1) <= 1 - spec.top_p
        drop[:, -1] = False
        keep = keep.scatter(1, order, ~drop & keep.gather(1, order))
    return keep


def _chunk(hidden, weight, bias, targets, spec: SamplerSpec, ids, seen, counts):
    grad = torch.is_grad_enabled()
    logits = torch.nn.functional.linear(hidden, weight, bias).float()
    if spec.needs_history:
        logits = _apply_penalties(logits, spec, ids, seen, counts, inplace=not grad)
    z = logits / spec.temperature if grad else logits.div_(spec.temperature)
    z_t = z.gather(1, targets[:, None])
    if not (spec.min_p > 0.0 or (spec.top_k or 0) > 0 or spec.top_p < 1.0):  # penalties only: nothing filtered
        return _finish_full(z, z_t, grad)
    n = z.size(0)
    rows = torch.arange(n, device=z.device)
    lp = ent = kept = None
    for m in CANDIDATE_TIERS:  # a row moves to the next tier only while its kept set spills past the candidates
        zr = z[rows] if len(rows) < n else z
        idx, keep, spilled = _candidates(zr, spec, m)
        zc = zr.gather(1, idx).masked_fill(~keep, -math.inf)  # normalise over the kept candidates only
        out = _finish(zc, z_t[rows], (keep & (idx == targets[rows, None])).any(-1))
        lp, ent, kept = out if lp is None else (x.index_put((rows,), y) for x, y in zip((lp, ent, kept), out))
        if not bool(spilled.any()):
            return lp, ent, kept
        rows = rows[spilled]
    zr = z[rows]  # wider still (a near-uniform row): vLLM's full sort on those rows
    keep = _kept_full(zr, spec)
    out = _finish(zr.masked_fill(~keep, -math.inf), z_t[rows], keep.gather(1, targets[rows, None]).squeeze(1))
    return tuple(x.index_put((rows,), y) for x, y in zip((lp, ent, kept), out))


def _finish(z_kept, z_t, kept_t):
    """Target logprob and entropy of the distribution over the kept logits (-inf elsewhere)."""
    lse = torch.logsumexp(z_kept, dim=-1, keepdim=True)
    lp = (z_kept - lse)
    p = lp.exp()
    entropy = -(p * lp.masked_fill(~torch.isfinite(lp), 0.0)).sum(-1)
    target = torch.where(kept_t, (z_t - lse).squeeze(1), torch.full_like(lse.squeeze(1), OUTSIDE_LOGPROB))
    return target, entropy, kept_t


def _finish_full(z, z_t, grad: bool):
    """`_finish` when every token is kept, with fewer full-vocabulary passes (in place without grad)."""
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    target = (z_t - lse).squeeze(1)
    lp = z - lse if grad else z.sub_(lse)
    entropy = -(lp.exp() * lp).sum(-1)
    return target, entropy, torch.ones_like(target, dtype=torch.bool)


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                   spec: SamplerSpec, hist: tuple | None = None):
    """Processed logprob of each target token, chunked so at most `CHUNK_BYTES` of logits exist at once (with
    autograd, each chunk is recomputed in backward instead of stored).

    Args: hidden [N, H], weight [V, H], bias [V] or None, targets [N]; hist = (ids, seen, counts), each [N, U], from
    `history` (needed for penalties). Returns (logprobs [N], entropy [N], in_support [N] bool); logprobs are
    `OUTSIDE_LOGPROB` where the target is outside the kept set.
    """
    N, V = hidden.size(0), weight.size(0)
    step = max(1, CHUNK_BYTES // (4 * V))
    outs = []
    for s in range(0, N, step):
        e = min(N, s + step)
        h = (None,) * 3 if hist is None else tuple(x[s:e] for x in hist)
        args = (hidden[s:e], weight, bias, targets[s:e], spec, *h)
        outs.append(checkpoint(_chunk, *args, use_reentrant=False) if torch.is_grad_enabled() else _chunk(*args))
    if not outs:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, empty, torch.zeros(0, dtype=torch.bool, device=hidden.device)
    return tuple(torch.cat(x) for x in zip(*outs))
