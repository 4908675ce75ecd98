"""The trainer's mixture-of-experts routers: which experts its forward sends each token to (recorded per forward),
and routing replay (R3, `routing_replay: true`): the forward sends each token to the experts the engine chose for it.

`RouterTaps.of(model)` finds the router of each MoE layer (transformers 5.19: `layers.{i}.mlp.gate`, a
`*TopKRouter` whose forward returns (router_logits, top_k_weights, top_k_index)) and hooks it; a dense model has
none and gets no hook (None). One forward pre-hook on the decoder (the module holding `layers`) reads each forward's
`input_ids` and `attention_mask`, so every router call knows which token of which sequence each of its rows is: rows
are the decoder's [batch, seq] flattened.

Recording: a forward without gradient (TRL's scoring of a batch, the gate's probes) keeps the top-k of every layer
([batch, seq, L, k]) with its token ids, in `recent` (the last few forwards) or in the list of an open `recording()`.
`routing_of(records, seqs)` finds each sequence's rows by its token ids (left-padded prompt then completion, as TRL
lays them out), so a record is found whatever the batch order or padding.

Replay: where a replay source knows a sequence (`sources`: callables returning {prompt + completion ids: rows
[len, L_engine, k]} and the engine's layer ids), the router's output is replaced: the top-k indices are the
engine's for that token and layer, the weights are the trainer's own router probabilities (softmax of its logits, in
fp32 as the family does) gathered at those indices and normalised as the family does (`ROUTERS`), so the gradient
flows through the router weights of the replayed experts, as in R3. A token the source does not cover (padding, the
last sampled token, a prompt block the engine served from its prefix cache) keeps the trainer's own choice. The
lookup is by token content, row by row (`replay_rows`), so it serves TRL's scoring forward and its loss forward (after
TRL's shuffle and split) alike. Under gradient checkpointing the routers run again in the backward pass: the replay of
the last decoder forward stays current until the next one starts (TRL's loss runs one forward per micro-batch, then
its backward).

Knows the transformers router classes listed in `ROUTERS` (read in transformers 5.19); nothing of vLLM.
"""

import re
from contextlib import contextmanager
from dataclasses import dataclass

import torch

NO_EXPERT = -1  # a token/layer without an expert id (not routed by that side, or not covered)
RECENT_FORWARDS = 32  # no-grad forwards kept in `recent` (TRL scores a batch in a few micro-batches)
INDEX_TOKENS = 8  # sequences are indexed by their first tokens for the content lookup


@dataclass(frozen=True)
class RouterRule:
    """How a family's router turns its probabilities at the chosen experts into routing weights: normalised over the
    top-k (`normalize`: True, or the name of the router attribute that says so) and cast back to the logits' dtype
    (`cast`)."""

    normalize: bool | str
    cast: bool


# transformers 5.19 forwards, read: softmax(logits, fp32) -> topk -> (/ sum if norm_topk_prob) -> to(logits.dtype);
# Mixtral always normalises and keeps the weights in fp32.
ROUTERS = {
    "Qwen3MoeTopKRouter": RouterRule("norm_topk_prob", True),
    "Qwen2MoeTopKRouter": RouterRule("norm_topk_prob", True),
    "OlmoeTopKRouter": RouterRule("norm_topk_prob", True),
    "MixtralTopKRouter": RouterRule(True, False),
}
_LAYER = re.compile(r"(.*)\.layers\.(\d+)\.")


def unknown_routers(model) -> list[str]:
    """Names of modules that look like an MoE router (`*Router` with a `top_k`) of a class `ROUTERS` does not
    know: their routing can be neither recorded nor replayed."""
    return [name for name, m in model.named_modules()
            if type(m).__name__.endswith("Router") and hasattr(m, "top_k") and type(m).__name__ not in ROUTERS]


class _Forward:
    """One decoder forward: its token ids and mask (CPU), the trainer's own top-k per layer, the experts it used
    (replay) and the replay rows it was given."""

    def __init__(self, ids, mask, n_layers: int, k: int, record: bool, replay):
        b, s = ids.shape
        self.ids, self.mask, self.record, self.replay = ids, mask, record, replay
        self.own = torch.full((b, s, n_layers, k), NO_EXPERT, dtype=torch.int16) if record else None
        self.used = self.own.clone() if record and replay is not None else None


class RouterTaps:
    """Hooks on a model's MoE routers (see module docstring)."""

    def __init__(self, decoder, routers: list):
        self.routers = routers  # [(layer id, module, RouterRule)], by layer id
        self.layers = tuple(layer for layer, _, _ in routers)
        self.top_k = int(routers[0][1].top_k)
        self.replay = False  # routing replay on (the config's routing_replay)
        self.sources: list = []  # callables -> (store {seq ids: rows [len, L_src, k]}, the store's layer ids)
        self.recent: list = []  # records of the last no-grad forwards outside `recording()`
        self._sinks: list = []  # open recording() lists
        self._current: _Forward | None = None
        # decoder forwards seen, and those that replayed some token: without gradient (scoring) and with (the loss)
        self.counts = {"forwards": 0, "replayed_no_grad": 0, "replayed_grad": 0}
        self._hooks = [decoder.register_forward_pre_hook(self._pre, with_kwargs=True),
                       decoder.register_forward_hook(self._post)]
        self._hooks += [m.register_forward_hook(self._router_hook(i, rule)) for i, (_, m, rule) in enumerate(routers)]

    @classmethod
    def of(cls, model) -> "RouterTaps | None":
        """Taps on `model`'s routers; None for a model without a router `ROUTERS` knows."""
        found, decoder = [], None
        for name, m in model.named_modules():
            rule = ROUTERS.get(type(m).__name__)
            hit = _LAYER.match(name + ".") if rule else None
            if hit:
                found.append((int(hit.group(2)), m, rule))
                decoder = decoder or model.get_submodule(hit.group(1))
        if not found:
            return None
        return cls(decoder, sorted(found, key=lambda x: x[0]))

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # -- hooks -----------------------------------------------------------------------------------------------------
    def _pre(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None or ids.dim() != 2:  # embeddings fed directly: no token ids to find the routing by
            self._current = None
            return None
        ids_cpu = ids.detach().to("cpu")
        mask = kwargs.get("attention_mask")
        mask_cpu = mask.detach().to("cpu") if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        replay = None
        if self.replay and self.sources:
            rows = self.replay_rows(ids_cpu, mask_cpu)
            if bool((rows >= 0).any()):
                replay = rows.to(ids.device, torch.long)
        grad = torch.is_grad_enabled()
        self._current = _Forward(ids_cpu, mask_cpu, len(self.layers), self.top_k, not grad, replay)
        self.counts["forwards"] += 1
        if replay is not None:
            self.counts["replayed_grad" if grad else "replayed_no_grad"] += 1
        return None

    def _post(self, module, args, output):
        f = self._current  # stays current: a checkpointed layer re-runs its router in the backward pass
        if f is not None and f.record and not getattr(f, "kept", False):
            f.kept = True
            if self._sinks:
                self._sinks[-1].append(f)
            else:
                self.recent = (self.recent + [f])[-RECENT_FORWARDS:]
        return None

    def _router_hook(self, col: int, rule: RouterRule):
        def hook(module, inputs, output):
            f = self._current
            if f is None or not isinstance(output, tuple) or len(output) != 3:
                return None
            logits, weights, index = output
            b, s = f.ids.shape
            if index.shape[0] != b * s:  # not the decoder's tokens (packed or re-shaped): leave it alone
                return None
            if f.record:
                f.own[:, :, col] = index.detach().view(b, s, -1).to("cpu", torch.int16)
            if f.replay is None:
                return None
            want = f.replay[:, :, col].reshape(b * s, -1)
            have = want[:, :1] >= 0
            if not bool(have.any()):
                return None
            use = torch.where(have, want, index)
            probs = torch.softmax(logits, dim=-1, dtype=torch.float)
            w = probs.gather(1, use)
            normalize = rule.normalize if isinstance(rule.normalize, bool) else bool(getattr(module,
                                                                                         rule.normalize, False))
            if normalize:
                w = w / w.sum(dim=-1, keepdim=True)
            if rule.cast:
                w = w.to(logits.dtype)
            if f.record:
                f.used[:, :, col] = use.detach().view(b, s, -1).to("cpu", torch.int16)
            return logits, w, use
        return hook

    # -- replay ----------------------------------------------------------------------------------------------------
    @contextmanager
    def replaying(self, store: dict, layers: tuple):
        """Replay from `store` ({prompt + completion ids: rows}, rows in `layers` order) too, inside the block."""
        source = lambda: (store, layers)  # noqa: E731
        self.sources.append(source)
        try:
            yield
        finally:
            self.sources.remove(source)

    def replay_rows(self, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The engine's experts for each token of a forward's rows ([b, s] ids and mask): [b, s, L, k] int16,
        NO_EXPERT where no source covers the token. A row is matched by its tokens from its first unmasked one: a
        stored sequence that agrees with it over the shorter of the two (at least every unmasked token, or the
        whole stored sequence) covers it; the longest such wins."""
        b, s = ids.shape
        out = torch.full((b, s, len(self.layers), self.top_k), NO_EXPERT, dtype=torch.int16)
        stored = []
        for get in self.sources:
            store, layers = get()
            cols = [layers.index(layer) if layer in layers else None for layer in self.layers]
            stored += [(key, rows, cols) for key, rows in store.items() if key]
        if not stored:
            return out
        h = min(INDEX_TOKENS, min(len(key) for key, _, _ in stored))  # every key indexed by as many tokens
        index: dict = {}
        for item in stored:
            index.setdefault(item[0][:h], []).append(item)
        rows_list = ids.tolist()
        for r in range(b):
            first, last = _span(mask[r] if mask is not None else None, s)
            if last < first:
                continue
            tokens = rows_list[r][first:]
            n_real = last - first + 1
            best = None
            for key, rows, cols in index.get(tuple(tokens[:h]), ()):
                m = min(len(key), n_real)
                if tuple(tokens[:m]) == key[:m] and (best is None or m > best[0]):
                    best = (len(key), rows, cols)
            if best is None:
                continue
            n, rows, cols = best
            n = min(n, s - first, rows.shape[0])
            for c, src in enumerate(cols):
                if src is not None:
                    out[r, first:first + n, c] = rows[:n, src]
        return out

    # -- recording -------------------------------------------------------------------------------------------------
    @contextmanager
    def recording(self):
        """Records of the no-grad forwards inside the block (a list, filled as they finish); they do not reach
        `recent`."""
        sink: list = []
        self._sinks.append(sink)
        try:
            yield sink
        finally:
            self._sinks.remove(sink)

    def take_recent(self) -> list:
        recent, self.recent = self.recent, []
        return recent

    def routing_of(self, records: list, seqs: list) -> list:
        """For each sequence (token ids: prompt + completion): (own rows [len, L, k], used rows or None) from the
        first record row holding it (its tokens from the row's first unmasked one), or (None, None)."""
        h = min([INDEX_TOKENS, *(len(q) for q in seqs if len(q))])
        index: dict = {}
        for f in records:
            b, s = f.ids.shape
            rows_list = f.ids.tolist()
            for r in range(b):
                first, _ = _span(f.mask[r] if f.mask is not None else None, s)
                index.setdefault(tuple(rows_list[r][first:first + h]), []).append((f, r, first))
        out = []
        for seq in seqs:
            seq = list(seq)
            found = (None, None)
            for f, r, first in index.get(tuple(seq[:h]), ()):
                n = len(seq)
                if first + n <= f.ids.shape[1] and f.ids[r, first:first + n].tolist() == seq:
                    found = (f.own[r, first:first + n], f.used[r, first:first + n] if f.used is not None else None)
                    break
            out.append(found)
        return out


def _span(mask_row, s: int) -> tuple[int, int]:
    """(first, last) unmasked column of a row (the whole row without a mask; last < first when all masked)."""
    if mask_row is None:
        return 0, s - 1
    on = mask_row.nonzero().flatten()
    if on.numel() == 0:
        return 0, -1
    return int(on[0]), int(on[-1])


def align(rows: torch.Tensor, from_layers: tuple, to_layers: tuple) -> torch.Tensor:
    """Rows [n, L_from, k] re-ordered to `to_layers` (a layer `from_layers` lacks: NO_EXPERT)."""
    out = torch.full((rows.shape[0], len(to_layers), rows.shape[-1]), NO_EXPERT, dtype=rows.dtype)
    for c, layer in enumerate(to_layers):
        if layer in from_layers:
            out[:, c] = rows[:, from_layers.index(layer)]
    return out
