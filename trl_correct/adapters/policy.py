"""The trainer's side of the gate: everything the gate asks of the policy, behind one small interface.

`PolicySide` wraps a CorrectGRPOTrainer: the trainer's own scoring path (TRL's `_get_per_token_logps_and_entropies`,
its fused head at the config's temperature, the processed head when the sampler does more), its loss and generation
for the audits, the subclass hooks (`trainer_facts`, `probe_prompts`, `extra_checks`, `correction`) and the
collectives over ranks. The gate (gate.py) holds one and never touches the trainer itself.

This is also the one place that changes state owned by others for a while and restores it, each under a name that
says what it isolates: `at_temperature` (TRL's temperature, the sampler and the head), `fp32_reference`
(accelerate's autocast), `isolated` (TRL's trackers, metrics and adaptive-entropy state while the gate runs its own
probes and audits), `without_replay` (routing replay, MoE).

Mixture-of-experts models: `routing` holds the taps on the trainer's routers (adapters/routing.py: the experts each
token is sent to, recorded per forward; routing replay when the config's `routing_replay` is on); None for a dense
model, which gets no hook.
"""

from contextlib import contextmanager, nullcontext
from dataclasses import replace

import torch
from accelerate.utils import gather_object

from .audit import (generated_rows, loss_audit, padded_batch, quiet_trackers, self_consistency, side_effects_undone,
                    token_identity)
from ..errors import ConfigError
from .head import add_processed_head
from .routing import RouterTaps, unknown_routers
from .trl_api import add_fused_lm_head, mark_engine_current, pad_token_id, score, tokenize_prompts
from .trl_api import dist as trl_dist, experts_implementation
from .weights import scoring_model

# Probe prompts are lengthened to one KV block plus this many tokens when prefix caching is on, so that each holds at
# least one full block a stale cache could serve (vLLM caches full blocks only).
PAST_BLOCK_TOKENS = 16


@contextmanager
def _set_for_a_while(obj, name: str, value):
    """`obj.name = value` inside the block, the old value restored after it (whatever happens inside)."""
    saved = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, saved)


class PolicySide:
    """The trainer as the gate sees it (see module docstring)."""

    def __init__(self, trainer):
        self._trainer = trainer
        self.running = False  # the gate's own probes and audits are running (TRL's loss and generation included)
        model = self.model()
        self.routing = RouterTaps.of(model)  # MoE: hooks on the routers; None for a dense model
        if getattr(trainer.args, "routing_replay", False):
            unknown = unknown_routers(model)
            if unknown or self.routing is None:
                raise ConfigError("routing_replay=True is invalid for this model: " + (
                    f"its router {unknown[0]} is of a class trl-correct cannot replay (adapters/routing.py ROUTERS)"
                    if unknown else "it has no mixture-of-experts router") + "; set routing_replay: false")
            self.routing.replay = True

    # -- what the trainer runs with --------------------------------------------------------------------------------
    @property
    def args(self):
        return self._trainer.args

    @property
    def temperature(self) -> float:
        return self._trainer.temperature

    @property
    def is_main_process(self) -> bool:
        return self._trainer.accelerator.is_main_process

    @property
    def num_processes(self) -> int:
        return self._trainer.accelerator.num_processes

    @property
    def device(self):
        return self._trainer.accelerator.device

    def model(self):
        return self._trainer.accelerator.unwrap_model(self._trainer.model)

    def vocab_size(self) -> int:
        return self.model().config.vocab_size

    def fp32_reference_unavailable(self) -> str | None:
        """Why the trainer cannot score in fp32 without a copy of the model; None when it can (fp32 weights under
        autocast)."""
        t = self._trainer
        weights = {p.dtype for p in self.model().parameters()}
        if t.compute_dtype == "float32":
            return "the trainer computes in float32: no wider reference without a copy"
        if weights != {torch.float32} or not t.accelerator.native_amp:
            return (f"the trainer's weights are {sorted(str(w) for w in weights)} without autocast: no fp32 "
                    "reference without a copy")
        return None

    def fp64_reference_unavailable(self) -> str | None:
        """Why the trainer's logprobs cannot be computed in float64 here (its weights converted in place for the
        while); None when they can."""
        t = self._trainer
        weights = {p.dtype for p in self.model().parameters()}
        if weights != {torch.float32}:
            return f"the trainer's weights are {sorted(str(w) for w in weights)}: no float64 reference without a copy"
        d = trl_dist(t)
        if getattr(d, "is_zero3", False) or getattr(d, "fsdp_version", None):
            return "the trainer's weights are sharded (ZeRO-3 / FSDP): no whole float64 copy on one rank"
        return None

    def reference_logprobs(self, prompt_ids, completion_ids, temperature: float,
                           dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The trainer's logprobs of `completion_ids` through the model's own forward (not TRL's fused head), one
        sequence at a time (no padding), the logits normalised in `dtype`: a plain implementation, as an engine
        computes. float64: the weights are converted in place for the while and back (fp32 -> fp64 -> fp32 is
        exact), the reference the precision floor is measured against. float32 (weights already fp32): the rounding a
        plain fp32 implementation makes (at vocab 151,936 TRL's fused head rounds 100x less than a plain fp32
        log-softmax, which is what vLLM's fp32 head does). Returns [B, T] float64, NaN past each completion's end."""
        from ..core.sampler import history, token_logprobs

        model = self.model()
        base = scoring_model(model)
        spec = replace(self._trainer.sampler, temperature=temperature)
        tensors = [x for x in (*model.parameters(), *model.buffers()) if x.is_floating_point()]
        dtypes = [x.dtype for x in tensors]
        width = max((len(c) for c in completion_ids), default=0)
        out = torch.full((len(completion_ids), width), float("nan"), dtype=torch.float64)
        experts = experts_implementation(base) if dtype == torch.float64 else None
        try:
            if experts not in (None, "eager"):  # grouped_mm / batched_mm refuse float64
                base.set_experts_implementation("eager")
            for x in tensors:
                x.data = x.data.to(dtype)
            with torch.no_grad(), torch.autocast(self.device.type, enabled=False):
                for i, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
                    if not c:
                        continue
                    ids = torch.tensor([list(p) + list(c)], device=self.device)
                    targets = ids[0, len(p):]
                    if spec.transforms:  # the engine's full sampler transform (sampler.py), on the final hidden state
                        hidden = base.base_model(input_ids=ids, use_cache=False).last_hidden_state[0, len(p) - 1:-1]
                        head = base.get_output_embeddings()
                        hist = None
                        if spec.needs_history:
                            pm = torch.ones(1, len(p), dtype=torch.long, device=self.device)
                            u, seen, counts = history(ids[:, :len(p)], pm, ids[:, len(p):])
                            hist = (u[0].expand(len(c), -1), seen[0], counts[0])
                        lp = token_logprobs(hidden, head.weight, head.bias, targets, spec, hist)[0]
                    else:  # the model's own logits (soft-capping, logit scales included) at the temperature
                        logits = type(base).forward(base, input_ids=ids, logits_to_keep=len(c) + 1).logits
                        lp = torch.log_softmax(logits[0, :-1].to(dtype) / temperature, dim=-1)
                        lp = lp.gather(-1, targets[:, None])[:, 0]
                    out[i, :len(c)] = lp.double().cpu()
        finally:
            for x, dt in zip(tensors, dtypes):
                x.data = x.data.to(dt)
            if experts not in (None, "eager"):
                base.set_experts_implementation(experts)
        return out

    # -- the subclass hooks ----------------------------------------------------------------------------------------
    def facts(self):
        return self._trainer.trainer_facts()

    def extra_checks(self, probe) -> list:
        return list(self._trainer.extra_checks(probe))

    def correction(self, trainer_logprobs, engine_logprobs, mask):
        return self._trainer.correction(trainer_logprobs, engine_logprobs, mask)

    def probe_prompts(self) -> list[list[int]]:
        return self._trainer.probe_prompts()

    def first_prompts(self) -> list:
        """The first `probe_size` training prompts, as the dataset holds them (the probe's, the dry batch's and the
        certificate's)."""
        return first_prompts(self._trainer)

    def default_probe_prompts(self, block_size: int | None) -> list[list[int]]:
        """Token ids of the first `probe_size` training prompts; with prefix caching on (`block_size`), each is
        lengthened past one KV block so a stale cached block would be reused (and caught)."""
        ids = [list(p) for p in tokenize_prompts(self._trainer, self.first_prompts())]
        if block_size:
            filler = [t for p in ids for t in p]
            need = block_size + PAST_BLOCK_TOKENS
            ids = [(filler * (need // max(len(filler), 1) + 1))[: max(need - len(p), 0)] + p for p in ids]
        return ids

    # -- scoring, through the trainer's own path -------------------------------------------------------------------
    @torch.no_grad()
    def score(self, prompt_ids: list[list[int]], completion_ids: list[list[int]]):
        """Trainer logprobs of `completion_ids` after `prompt_ids`, through TRL's own scoring path.
        Returns (trainer_logprobs [B, T], mask [B, T])."""
        t = self._trainer
        b = padded_batch(prompt_ids, completion_ids, pad_token_id(t), self.device)
        ids = torch.cat([b["prompt_ids"], b["completion_ids"]], 1)
        attn = torch.cat([b["prompt_mask"], b["completion_mask"]], 1)
        lps, _, _ = score(t, ids, attn, b["completion_ids"].size(1), t.args.per_device_train_batch_size)
        return lps.float(), b["completion_mask"]

    @contextmanager
    def at_temperature(self, temp: float):
        """Score at temperature `temp` through the same path as always: TRL's fused head (and the processed head when
        the sampler does more) re-installed at `temp` for the duration, then the trainer's own head back."""
        t = self._trainer
        if temp == t.temperature:
            yield
            return
        model = scoring_model(self.model())
        saved = (model.forward, t.temperature, t.sampler)
        t.temperature, t.sampler = temp, replace(t.sampler, temperature=temp)
        add_fused_lm_head(model, temperature=temp, cast_lm_head_to_fp32=t.args.fp32_lm_head,
                          outputs=("log_probs", "entropy"))
        if t.sampler.transforms and not t.sampler_unsupported:
            add_processed_head(model, t.sampler, fp32_lm_head=t.args.fp32_lm_head)
        try:
            yield
        finally:
            model.forward, t.temperature, t.sampler = saved

    def fp32_reference(self):
        """TRL's scoring with accelerate's autocast off: the fp32 reference of a bf16/fp16 trainer with fp32
        weights."""
        return _set_for_a_while(self._trainer.accelerator, "native_amp", False)

    def self_consistency(self, probe) -> dict:
        return self_consistency(self, probe.prompt_ids, probe.completion_ids, probe.trainer_logprobs, probe.mask)

    def loss_audit(self, probe):
        return loss_audit(self._trainer, probe.prompt_ids, probe.completion_ids, probe.trainer_logprobs)

    def linear_loss(self, linear_types: tuple) -> bool:
        return self._trainer.loss_type in linear_types

    def dry_batch(self):
        """Generate for the probe's prompts through TRL's `_generate` (audit.generated_rows)."""
        return generated_rows(self._trainer, self.first_prompts())

    def engine_synced(self) -> None:
        """Tell TRL's loop the engine holds this step's weights, so its own sync inside generation does nothing."""
        mark_engine_current(self._trainer)

    def eos_token_ids(self):
        return self._trainer.eos_token_ids

    # -- state the gate's own runs must leave as they found it -----------------------------------------------------
    @contextmanager
    def isolated(self, trackers: bool = False):
        """While the gate runs its own probes and audits: `running` is true (a subclass's loss can tell), TRL's
        metrics and adaptive-entropy state are restored afterwards, and (before training, `trackers`) report_to is
        off so TRL's profiling does not reach trackers that have not started."""
        with (quiet_trackers(self._trainer) if trackers else nullcontext()), _set_for_a_while(self, "running", True):
            yield

    def without_replay(self):
        """The trainer's forward on its own routing (replay off) inside the block (the gate's figures without
        replay)."""
        return _set_for_a_while(self.routing, "replay", False) if self.routing else nullcontext()

    def side_effects_undone(self):
        return side_effects_undone(self._trainer)

    # -- over ranks ------------------------------------------------------------------------------------------------
    def identity_counts(self, rows, sampled: dict, eos_ids=()) -> tuple[int, int, str]:
        """token_identity over this rank's rows, counted over all ranks: (rows, bad rows, an example)."""
        n_bad, example = token_identity(rows, sampled, eos_ids)
        n_rows, n_bad = (int(x) for x in self._trainer.accelerator.gather(
            torch.tensor([[len(rows), n_bad]], device=self.device)).sum(0))
        return n_rows, n_bad, example

    def gather_flat(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate a 1-D tensor of any length from every rank."""
        acc = self._trainer.accelerator
        if acc.num_processes == 1:
            return x
        x = x.double()
        n = acc.gather(torch.tensor([x.numel()], device=x.device))
        padded = torch.full((int(n.max()),), float("nan"), dtype=x.dtype, device=x.device)
        padded[: x.numel()] = x
        allx = acc.gather(padded)
        return allx[~torch.isnan(allx)]

    def from_every_rank(self, obj) -> list:
        return [obj] if self.num_processes == 1 else gather_object([obj])


def first_prompts(trainer) -> list:
    """The first `probe_size` training prompts of `trainer`, as its dataset holds them."""
    n = min(trainer.args.probe_size, len(trainer.train_dataset))
    return [trainer.train_dataset[i]["prompt"] for i in range(n)]
