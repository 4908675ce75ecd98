"""The correctness gate as a component: built from the engine, the trainer's side (adapters/policy.py) and the config;
it owns the thresholds, the calibration, the last sync check and the step of the last load, and answers three
calls:

    gate.before_training(step)    sync, then every check of the start gate            -> GateRun
    gate.after_sync(step)         a new optimizer step's sync and the checks due then -> GateReport
    gate.on_batch(out, sampled, step, tis_enabled)   the checks of one training batch -> BatchVerdict

Which checks run when is data, `SCHEDULE`. Deciding is core/checks.py's, thresholds are core/calibrate.py's,
measuring is core/numerics.py's; the policy (enforce / warn / observe, TIS on or off) is the trainer's.

Mixture-of-experts models (the trainer's `policy.routing` taps exist): the probe also compares the experts the engine
routed each probe token to while it generated (`Engine.last_routing`) with the trainer's router top-k on the same
tokens, against the trainer's own floor (its probe batch scored whole vs one sequence at a time, and at its compute
dtype vs fp32); with `routing_replay` on, every scoring the gate runs replays the engine's experts (as training
does), and the figures without replay are measured beside them. Every training batch gets the same figures
(`MismatchStats.routing`, logged as correct/routing/*), and its rollouts' routing (`Engine.take_routing()`) is what
TRL's loss forwards of that batch replay. A dense model: none of this runs.
"""

import logging
import time
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field, replace

import torch

from .core.calibrate import CAPS, PRECISION_FLOOR, Calibration, calibrate
from .core.checks import (BLOCKING, LINEAR_LOSS_TYPES, Check, GateReport, clip_check, loss_audit_check, mismatch_check,
                          missed_sync_check, non_finite_check, reset_check, routing_check, routing_threshold,
                          routing_unavailable_check,
                          self_consistency_check, stale_cache_check, static_checks, support_check, temperature_check,
                          token_identity_check, weight_sync_check)
from .core.numerics import measure, routing_flips, summarize_gaps, valid_gaps
from .core.records import MAX, MEAN, P99, Floors, MismatchStats
from .adapters.audit import AUDIT_SCALES
from .adapters.routing import align
from .adapters.trl_api import pad

logger = logging.getLogger("trl_correct")
PROBE_SEED = 1234
# Cached-prefix probe this many times worse than the uncached one = stale cache. Clean bf16 CPU runs measured the two
# within 10 % (0.0067 vs 0.0072); a cache left stale across a 0.1-std weight move measured 4.7x (0.033 vs 0.007).
STALE_FACTOR = 2.0
# ...and worse by at least this share of the mean threshold (two near-zero fp32 figures can differ 2x by chance).
STALE_MIN_SHARE = 0.1
# Second temperature of the temperature check when the config's is 1 (at T=1 a temperature applied twice or never
# changes nothing, so the fault can only show away from it).
ALT_TEMPERATURE = 0.7
# precise_probe: auto runs the fp32 twin up to this many parameters (their float32 copy in the twin: 8 GB)
PRECISE_AUTO_MAX_PARAMS = 2e9
# The fp32 probe's prompts (the first of the probe's): at the Qwen2.5-0.5B shape in bf16 on 2 cores, all 8 made it 59 s
# of a 157 s gate (1.6x the gate without it); the faults it catches sit at 8e3x-7e5x of its thresholds there.
PRECISE_PROMPTS = 4


def as_padded(logprobs: list[list[float]], device) -> torch.Tensor:
    """An engine's per-sequence logprobs as one float32 [sequences, tokens] tensor, right-padded with NaN past each
    sequence's end (outside the trainer's completion mask, as the trainer's scores are padded)."""
    return pad([torch.tensor(x, dtype=torch.float32) for x in logprobs], padding_value=float("nan"),
               padding_side="right").to(device)


# When each group of checks runs (the data the gate is assembled from):
#   start    the full gate before step 0 (and after a resume): `before_training()`
#   interval every `probe_interval` optimizer steps, after that step's weight sync: `after_sync(step)`
#   sync     after every other weight sync in training (`sync+caching`: only when prefix caching is on)
#   batch    every training batch: `on_batch(...)`
SCHEDULE = {
    "static": ("start", "interval"),  # core.checks.STATIC_CHECKS on both sides' facts
    "weight_sync": ("start", "interval", "sync", "batch"),  # the engine's fingerprint after each load (batch: the
    #                                                        loads made inside generation, sleep mode)
    "prefix_cache_reset": ("start", "interval", "sync"),  # vLLM's answer to the reset (prefix caching on only)
    "probe": ("start", "interval", "sync+caching"),  # probe mismatch, non-finite, clip share, cache differential
    "calibration": ("start", "interval"),  # floors on the trainer alone -> thresholds; trainer_consistency
    "audits": ("start",),  # dry batch token identity, temperature, loss audit
    "extra": ("start", "interval"),  # a subclass's extra_checks(probe)
    "batch_identity": ("batch",),  # the scored token ids are the engine's
    "batch_support": ("batch",),  # sampled tokens inside the trainer's kept set; every logprob finite
    "batch_mismatch": ("batch",),  # mismatch and clip share of the real batch (decide only while TIS is on)
    "precise_probe": ("start", "interval"),  # bf16/fp16: the probe again with both sides in fp32 (mismatch_fp32)
    "routing": ("start", "interval"),  # MoE: the probe's routing flips against the trainer's own floor; replay
    "batch_routing": ("batch",),  # MoE: the batch's routing figures (metrics); with replay on, replay must be aligned
}


def due(group: str, when: str, caching: bool = False) -> bool:
    runs = SCHEDULE[group]
    return when in runs or (caching and when == "sync" and "sync+caching" in runs)


@dataclass(frozen=True)
class ProbeResult:
    """One probe: the engine sampled `completion_ids` after `prompt_ids` at `temperature`, the trainer scored them."""

    prompt_ids: list
    completion_ids: list
    trainer_logprobs: torch.Tensor  # [B, T]
    engine_logprobs: torch.Tensor  # [B, T] (NaN past each completion's end)
    mask: torch.Tensor  # [B, T] bool: the tokens counted (finite on both sides, inside the trainer's kept set)
    stats: MismatchStats
    gaps: torch.Tensor = field(repr=False)  # |Δlogp| of each counted token (the doctor's plot)
    temperature: float = 1.0
    # MoE: {"store": {prompt + completion ids: engine rows}, "engine": [...], "own": [...], "used": [...]} per
    # sequence, rows [len, L, k] in the trainer's layer order (stats.routing holds the figures); None: dense
    routing: dict | None = field(default=None, repr=False)


@dataclass(frozen=True)
class GateRun:
    """A gate run with what it measured: the report, the probe it rests on and the floors it calibrated from."""

    report: GateReport
    probe: ProbeResult | None
    floors: Floors


@dataclass
class BatchVerdict:
    """One training batch through the gate: the failed checks (none: passed), whether its mismatch is within the
    thresholds, its statistics, and what the loss gets: `keep` (tokens to train on), cleaned logprobs, the importance
    weights."""

    failed: list
    passed: bool
    stats: MismatchStats
    keep: torch.Tensor
    trainer_logprobs: torch.Tensor
    engine_logprobs: torch.Tensor
    weights: torch.Tensor

    def drop_unscorable(self, out: dict) -> None:
        """Take the tokens outside the trainer's kept set or with a non-finite logprob out of TRL's batch `out`
        (completion_mask and both logprob tensors), so that no loss term is computed on them."""
        if self.stats.n_outside_support or self.stats.n_nonfinite:
            mask = out["completion_mask"] if "tool_mask" not in out else out["completion_mask"] * out["tool_mask"]
            out["completion_mask"] = out["completion_mask"] * (self.keep | ~mask.bool())
            out["old_per_token_logps"], out["sampling_per_token_logps"] = self.trainer_logprobs, self.engine_logprobs


class Gate:
    """The gate (see module docstring). `engine` is public: the trainer replaces it when it rebuilds the engine."""

    def __init__(self, engine, policy, args, compute_dtype: str, on_gpu: bool):
        self.engine, self.policy, self.args = engine, policy, args
        self.compute_dtype, self.on_gpu = compute_dtype, on_gpu
        # until the gate has measured the floors: the fixed per-dtype values (and the user's)
        self.calibration: Calibration = calibrate({}, compute_dtype, on_gpu, user=args.user_thresholds(),
                                                  bit_exact=args.bit_exact)
        self.thresholds: dict = self.calibration.values()
        self.last_sync_check: Check | None = None
        self.synced_step = -1  # optimizer step at which the engine last received the weights
        self.fresh_shift = 0  # first-token shift of the last uncached probe (prefix-cache differential)
        self.routing_floor: dict | None = None  # MoE: the trainer's routing against itself (the larger floor)
        self.batch_routing: dict = {}  # MoE: the last batch's rollout routing, replayed by TRL's loss forwards
        if policy.routing is not None:  # replay sources: this round's rollouts, then the batch being trained on
            policy.routing.sources += [lambda: (self.engine.rollout_routing, self.engine.routing_layers),
                                       lambda: (self.batch_routing, self.engine.routing_layers)]

    # -- the four calls --------------------------------------------------------------------------------------------
    def before_training(self, step: int = 0) -> GateRun:
        """Sync the trainer's weights (optimizer step `step`) into the engine, then every check of the start gate (no
        policy applied)."""
        with self.policy.isolated(trackers=True):
            with self.phase("weight sync and its verification"):
                self.sync(step)
            return self.checks("start")

    def after_sync(self, step: int) -> GateReport:
        """A new optimizer step: sync, then the checks `SCHEDULE` lists after it (interval or sync)."""
        self.sync(step)
        with self.policy.isolated():
            return self.checks("interval" if self.full_check_due(step) else "sync").report

    def full_check_due(self, step: int) -> bool:
        """Whether the sync at `step` is followed by the interval gate (every `probe_interval` steps) rather than the
        lighter sync checks; a passing interval gate may switch TIS back on."""
        every = self.args.probe_interval
        return bool(every) and step % every == 0

    def on_batch(self, out: dict, sampled: dict, step: int, tis_enabled: bool) -> BatchVerdict:
        """The checks of one training batch (TRL's output dict `out`; `sampled`: what the engine generated for it).
        Mismatch and clip share decide only while TIS is on: a drift is reported once, when it switches TIS off."""
        label = f"batch at step {step}"
        failed = []
        if due("weight_sync", "batch"):
            if self.args.verify_weight_sync and self.synced_step != step:  # generated without this step's weights
                failed.append(missed_sync_check(step, self.synced_step))
            stale = self.engine.take_repush_stale()
            if stale:  # a reload inside generation (sleep mode) did not land
                failed.append(weight_sync_check(stale, self.engine.sync_count))
        if due("batch_identity", "batch"):
            failed.append(self.token_identity_of_batch(out, sampled, label))
        mask = out["completion_mask"] if "tool_mask" not in out else out["completion_mask"] * out["tool_mask"]
        m = measure(out["old_per_token_logps"], out["sampling_per_token_logps"], mask, self.policy.correction,
                    gather=self.policy.gather_flat)
        stats = MismatchStats.of(m.stats)
        if self.policy.routing is not None and due("batch_routing", "batch"):
            routing = self.routing_of_batch()
            stats = replace(stats, routing=routing)
            if routing is not None and "replay" in routing:
                failed.append(routing_check(routing, self.routing_floor, self.calibration.dtype, label))
        if due("batch_support", "batch"):
            failed += [support_check(stats.n_outside_support, label), non_finite_check(stats.n_nonfinite, label)]
        check = mismatch_check(stats, self.thresholds, label=label)
        if due("batch_mismatch", "batch") and tis_enabled:
            failed += [check, clip_check(stats.clip_frac, self.args.max_clip_frac, label)]
        failed = [c for c in failed if not c.passed]
        return BatchVerdict(failed, check.passed and not failed, stats, m.keep, m.trainer_logprobs, m.engine_logprobs,
                            m.weights)

    @contextmanager
    def phase(self, name: str):
        """One phase of a full gate, reported when it ends with its elapsed seconds (`on_phase`)."""
        start = time.perf_counter()
        yield
        self.on_phase(name, time.perf_counter() - start)

    def on_phase(self, name: str, seconds: float) -> None:
        """Where phase reports go: the `trl_correct` logger at INFO, on the main process (override or replace to send
        them elsewhere)."""
        if self.policy.is_main_process:
            logger.info("trl-correct gate: %s done in %.1f s", name, seconds)

    # -- sync ------------------------------------------------------------------------------------------------------
    def sync(self, step: int) -> Check:
        """Push the trainer's weights into the engine now and verify them (the weight_sync check)."""
        count = self.engine.sync_count
        stale = self.engine.sync_weights()
        self.policy.engine_synced()  # TRL's generation (the dry batch, the step's batch) must not sync again
        if self.engine.sync_count == count:  # nothing was streamed: whatever it answered, the engine is as it was
            self.last_sync_check = missed_sync_check(step, self.synced_step, called=True)
        else:
            self.synced_step = step
            self.last_sync_check = weight_sync_check(list(stale or []), self.engine.sync_count)
        return self.last_sync_check

    # -- the probe and the floors ----------------------------------------------------------------------------------
    def probe(self, prompt_ids: list[list[int]] | None = None, temperature: float | None = None) -> ProbeResult:
        """Engine samples from the probe prompts; the trainer scores the same tokens (both at `temperature`, default
        the config's)."""
        prompt_ids = self.policy.probe_prompts() if prompt_ids is None else prompt_ids
        t = self.policy.temperature if temperature is None else temperature
        completion_ids, engine_lps = self.engine.sample(prompt_ids, max_tokens=self.args.probe_tokens,
                                                        seed=PROBE_SEED + self.args.seed, temperature=t)
        routing = self._engine_routing(prompt_ids, completion_ids)
        with self.routing_recorded(routing) as records, self.policy.at_temperature(t):
            trainer_lps, mask = self.policy.score(prompt_ids, completion_ids)
        engine_lps = as_padded(engine_lps, trainer_lps.device)
        m = measure(trainer_lps, engine_lps, mask, self.policy.correction)
        stats = MismatchStats.of(m.stats)
        if routing is not None:
            routing["own"], routing["used"] = self._trainer_routing(records, prompt_ids, completion_ids)
            stats = replace(stats, routing=self._figures(routing))
        return ProbeResult(prompt_ids, completion_ids, trainer_lps, engine_lps, m.keep, stats, m.gaps, t, routing)

    # -- routing (MoE) ---------------------------------------------------------------------------------------------
    def _engine_routing(self, prompt_ids, completion_ids) -> dict | None:
        """The engine's routing of the sequences its last sample() generated, as {"store", "engine"} (see
        ProbeResult.routing); None for a dense model or where the engine reports none."""
        taps = self.policy.routing
        if taps is None or not self.engine.routing_layers:
            return None
        rows = self.engine.last_routing
        if not rows or all(r is None for r in rows):
            return None
        layers = self.engine.routing_layers
        store = {tuple(p) + tuple(c): r for p, c, r in zip(prompt_ids, completion_ids, rows) if r is not None}
        return {"store": store, "layers": layers,
                "engine": [align(r, layers, taps.layers) if r is not None else None for r in rows]}

    @contextmanager
    def routing_recorded(self, routing: dict | None):
        """The trainer's routing recorded inside the block (yields the records; [] for a dense model), replaying
        the engine's experts of `routing` when replay is on."""
        taps = self.policy.routing
        if taps is None:
            yield []
            return
        with ExitStack() as stack:
            records = stack.enter_context(taps.recording())
            if routing is not None and taps.replay:
                stack.enter_context(taps.replaying(routing["store"], routing["layers"]))
            yield records

    def _trainer_routing(self, records, prompt_ids, completion_ids) -> tuple[list, list]:
        found = self.policy.routing.routing_of(records, [list(p) + list(c) for p, c in zip(prompt_ids,
                                                                                            completion_ids)])
        return [own for own, _ in found], [used for _, used in found]

    def _figures(self, routing: dict) -> dict:
        """Engine vs trainer routing figures of one probe (numerics.routing_flips; with replay on, `replay`: the
        engine's experts vs those the trainer really computed with)."""
        figures = dict(routing_flips(routing["engine"], routing["own"]), source=self.engine.routing_source)
        if self.policy.routing.replay:
            figures["replay"] = routing_flips(routing["engine"], routing["used"])
        return figures

    def routing_of_batch(self) -> dict | None:
        """The routing figures of the training batch just scored: the engine's rollout routing (taken now; TRL's
        loss forwards of this batch replay it when replay is on) against the trainer's router top-k recorded while
        TRL scored the batch, counted over every rank. None when the engine reported no routing."""
        taps = self.policy.routing
        self.batch_routing = self.engine.take_routing()
        records = taps.take_recent()
        if not self.batch_routing or not self.engine.routing_layers:
            return None
        layers = self.engine.routing_layers
        seqs = list(self.batch_routing)
        engine = [align(self.batch_routing[s], layers, taps.layers) for s in seqs]
        found = taps.routing_of(records, seqs)
        pairs = [("own", [own for own, _ in found])] + ([("replay", [used for _, used in found])] if taps.replay
                                                        else [])
        out = {}
        for name, trainer in pairs:
            f = routing_flips(engine, trainer)
            counts = torch.tensor([f["flip_frac_token_layer"] * f["n_token_layers"], f["n_token_layers"],
                                   f["flip_frac_token"] * f["n_tokens"], f["n_tokens"]], dtype=torch.float64)
            c = self.policy.gather_flat(counts).view(-1, 4).sum(0).tolist()
            f = {"flip_frac_token_layer": c[0] / c[1] if c[1] else 0.0, "flip_frac_token": c[2] / c[3] if c[3] else 0.0,
                 "n_token_layers": int(c[1]), "n_tokens": int(c[3])}
            if name == "own":
                out.update(f, source=self.engine.routing_source)
            else:
                out["replay"] = f
        return out

    def measure_floors(self, probe: ProbeResult) -> Floors:
        """The noise floors of calibrate.py, on the probe's tokens and the trainer alone: its batch scored whole vs
        one sequence at a time, and (bf16/fp16 with fp32 weights) under autocast vs in fp32. A floor that cannot be
        measured here is a string saying why. Taken over all ranks (the maximum), so every rank decides alike."""
        routing = {}
        with self.routing_recorded(probe.routing) as records:
            floors = {"trainer_vs_itself": self.policy.self_consistency(probe)}
        routing["trainer_vs_itself"] = records
        why_not = self.policy.fp32_reference_unavailable()
        if why_not:
            floors["dtype_rounding"] = why_not
        else:
            with self.routing_recorded(probe.routing) as records, self.policy.fp32_reference():
                reference, _ = self.policy.score(probe.prompt_ids, probe.completion_ids)
            routing["dtype_rounding"] = records
            floors["dtype_rounding"] = summarize_gaps(*valid_gaps(probe.trainer_logprobs, reference, probe.mask))
        if self.compute_dtype == "float32":
            floors["fp32_rounding"] = self.fp32_rounding(probe)
        if probe.routing is not None:
            self.routing_floor = self._routing_floor(probe, routing)
        return Floors.max_over(self.policy.from_every_rank(floors))

    def fp32_rounding(self, probe: ProbeResult) -> dict | str:
        """The precision floor of a float32 trainer on the probe's tokens (`precision_floor`, routing replayed as in the
        probe): it replaces the fixed fp32 minimum (calibrate.py). A string when it cannot be measured here."""
        why_not = ("precision_floor: false" if not self.args.precision_floor
                   else self.policy.fp64_reference_unavailable())
        if why_not:
            return why_not
        return self.precision_floor(probe.prompt_ids, probe.completion_ids, probe.temperature, probe.trainer_logprobs,
                                    probe.mask, probe.routing)

    # -- the precise probe (bf16/fp16) --------------------------------------------------------------------------
    def precise_unavailable(self) -> str | None:
        """Why the fp32 probe does not run on this trainer; None when it does (config precise_probe)."""
        a = self.args
        mode = a.precise_probe
        if mode == "off":
            return "precise_probe: off"
        if self.compute_dtype == "float32":
            return "the trainer computes in float32: the probe itself is the precise one (fp32_rounding floor)"
        if a.bit_exact:
            return "bit_exact: the probe must match exactly already"
        if self.engine.settings.tensor_parallel_size > 1 or self.policy.num_processes > 1:
            return "more than one process: the fp32 twin engine is built for one process without tensor parallelism"
        why = self.policy.fp32_reference_unavailable() or self.policy.fp64_reference_unavailable()
        if why:
            return why
        if mode == "auto":
            if self.on_gpu:
                return ("auto: not on a GPU yet (the fp32 twin's memory beside the production engine is not sized "
                        "there); precise_probe: on to run it")
            n = sum(p.numel() for p in self.policy.model().parameters())
            if n > PRECISE_AUTO_MAX_PARAMS:
                return (f"auto: {n / 1e9:.1f}B parameters (> {PRECISE_AUTO_MAX_PARAMS / 1e9:g}B: the twin holds them "
                        "in float32); precise_probe: on to run it")
        return None

    def precise_probe(self, probe: ProbeResult) -> tuple[Check, dict]:
        """The probe again with both sides in float32 from the same weights: the engine's fp32 twin (loaded from the
        trainer's weights, fingerprint-verified) samples the first PRECISE_PROMPTS probe prompts (its margins run
        1e3-1e6x, so more tokens buy little; each costs three more forwards); the trainer scores them with autocast
        off. Judged by calibrate.py's rule against the precision floor on these tokens, so a fault that does not
        depend on the dtype shows far inside bf16 noise. Covers: the sampler, temperature and logprobs mode, the model
        as each side builds it (config fields, quirks, kernels in fp32), the tokens, the weights as streamed. Not: the
        production engine's dtype-specific behaviour (a bf16 head) or its state (cache, sleep, its own sync): the
        bf16 probe and the sync fingerprint keep those. Returns the check and its figures (mismatch.fp32_probe)."""
        twin = self.engine.fp32_twin()
        stale = twin.sync_weights()
        label = "fp32 probe (both sides float32, same weights)"
        if stale:
            return Check("mismatch_fp32", False, f"{label}: the fp32 twin's weights differ from the trainer's after its "
                         f"load: {', '.join(stale[:3])}", "the weight stream itself is wrong (see weight_sync)",
                         measured=len(stale), threshold=0), {"stale": stale}
        t, prompts = probe.temperature, probe.prompt_ids[:PRECISE_PROMPTS]
        ids, trainer_lps, mask, stats = self._twin_probe(prompts, t)
        floor = self.precision_floor(prompts, ids, t, trainer_lps, mask)
        cal = calibrate({PRECISION_FLOOR: floor}, "float32", self.on_gpu)
        check = mismatch_check(stats, cal.values(), label)
        check = replace(check, name="mismatch_fp32", detail=check.detail + (
            f"; floor: fp32 vs fp64 mean {floor[MEAN]:.3g}, p99 {floor[P99]:.3g} (thresholds 8 x floor, k3 64 x)"
            if isinstance(floor, dict)
            else f"; fp32 vs fp64 floor not measured ({floor})"))
        if not check.passed:
            check = replace(check, fix="with both sides in float32 the engine and the trainer still differ beyond the "
                                       "trainer's own fp32 rounding: a fault that does not depend on the dtype (the "
                                       "sampler, temperature, logprobs, a model config field or quirk read "
                                       "differently on one side); trl-correct doctor ablates the known ones")
        figures = dict({k: stats[k] for k in (MEAN, P99, MAX, "kl_k3", "n_tokens")}, thresholds=cal.values(),
                       floor={k: floor[k] for k in (MEAN, P99, "kl_k3", "n_tokens")} if isinstance(floor, dict)
                       else floor,
                       rule={k: th.rule for k, th in cal.thresholds.items()})
        return check, figures

    def _twin_probe(self, prompts: list[list[int]], t: float):
        """The fp32 twin samples from `prompts` at temperature `t`; the trainer scores the same tokens in float32.
        Returns (completion ids, trainer logprobs, mask, mismatch stats)."""
        ids, lps = self.engine.twin.sample(prompts, max_tokens=self.args.probe_tokens, seed=PROBE_SEED + self.args.seed,
                                           temperature=t)
        with self.routing_recorded(None), self.policy.fp32_reference(), self.policy.at_temperature(t):
            trainer_lps, mask = self.policy.score(prompts, ids)
        return ids, trainer_lps, mask, measure(trainer_lps, as_padded(lps, trainer_lps.device), mask,
                                               self.policy.correction).stats

    def precision_floor(self, prompt_ids, completion_ids, temperature: float, scored: torch.Tensor, mask: torch.Tensor,
                        routing=None) -> dict | str:
        """The fp32 rounding of two fp32 implementations against float64 on these tokens, each statistic the larger:
        `scored` (the trainer's own fp32 logprobs, TRL's path) and a plain fp32 forward (the model's logits,
        log-softmax in fp32, as an engine computes: measured on this CPU it tracks vLLM's fp32 gap, tiny 9e-7 against
        9e-7, vocab 151,936 5.0e-5 against 4.6e-5, where TRL's fused head alone rounds to 4e-7). A string saying why
        when a kernel of this model refuses float64: the floor is then unmeasured (the fixed minimum applies, and
        the table says so), never the gate broken."""
        try:
            with self.routing_recorded(routing):
                exact = self.policy.reference_logprobs(prompt_ids, completion_ids, temperature, torch.float64)
                plain = self.policy.reference_logprobs(prompt_ids, completion_ids, temperature, torch.float32)
        except (RuntimeError, NotImplementedError, TypeError) as e:
            return f"the float64 forward failed here ({type(e).__name__}: {str(e)[:120]})"
        width = min(exact.size(1), scored.size(1))
        exact = exact[:, :width].to(scored.device)
        m = mask[:, :width]
        a = summarize_gaps(*valid_gaps(scored[:, :width], exact, m))
        b = summarize_gaps(*valid_gaps(plain[:, :width].to(scored.device), exact, m))
        return {k: max(a[k], b[k]) if k not in ("n_tokens", "n_nonfinite") else a[k] for k in a}  # the same tokens

    def _routing_floor(self, probe: ProbeResult, records: dict) -> dict:
        """The trainer's router top-k of the probe batch against itself scored one sequence at a time, and at its
        compute dtype vs fp32 (where measured): the larger, by flipped token-layer share, with both named."""
        own = probe.routing["own"]
        floors = {name: routing_flips(own, self._trainer_routing(recs, probe.prompt_ids, probe.completion_ids)[0])
                  for name, recs in records.items()}
        name = max(floors, key=lambda k: floors[k]["flip_frac_token_layer"])
        return dict(floors[name], source=name, floors=floors)

    def engine_floor(self, probe: ProbeResult) -> dict:
        """The engine against itself across batch compositions: each probe prompt sampled alone with the probe's
        seed, its logprobs compared with the batched probe's on the tokens both runs sampled alike (the doctor's
        --calibrate; the gate does not use it, so that a broken engine never loosens its own thresholds)."""
        gaps = []
        for i, (prompt, completion) in enumerate(zip(probe.prompt_ids, probe.completion_ids)):
            ids, lps = self.engine.sample([prompt], max_tokens=self.args.probe_tokens,
                                          seed=PROBE_SEED + self.args.seed, temperature=probe.temperature)
            same = next((j for j, (x, y) in enumerate(zip(completion, ids[0])) if x != y),
                        min(len(completion), len(ids[0])))
            gaps.append(torch.tensor(lps[0][:same], dtype=torch.float64)
                        - probe.engine_logprobs[i, :same].double().cpu())
        r = torch.cat(gaps) if gaps else torch.zeros(0, dtype=torch.float64)
        finite = torch.isfinite(r)
        return summarize_gaps(r[finite], int((~finite).sum()))

    def calibrate(self, floors: Floors) -> Calibration:
        """Set the thresholds from `floors` (calibrate.py's rule; the config's own thresholds win) and return them."""
        a = self.args
        self.calibration = calibrate(floors.to_dict() if a.calibrate else {}, self.compute_dtype, self.on_gpu,
                                     user=a.user_thresholds(), bit_exact=a.bit_exact)
        self.thresholds = self.calibration.values()
        return self.calibration

    # -- checks ----------------------------------------------------------------------------------------------------
    def checks(self, when: str) -> GateRun:
        """Every check `SCHEDULE` lists for `when` (start / interval / sync), on the engine as it is now (the caller
        has synced it). Does not apply the policy."""
        caching = self.engine.settings.enable_prefix_caching
        checks, probe, floors, precise, raw = [], None, Floors(), None, None
        facts = (self.policy.facts(), self.engine.facts()) if due("static", when, caching) else None
        if facts:
            checks += static_checks(*facts)
        if due("prefix_cache_reset", when, caching) and caching:
            checks.append(reset_check(self.engine.last_reset_ok))
        if due("weight_sync", when, caching) and self.args.verify_weight_sync:
            checks.append(self.last_sync_check)
        blocked = [c.name for c in checks if not c.passed and c.name in BLOCKING]
        # every rank probes or none does: the probe has collectives (a TP engine, the floors' max over ranks)
        blocked = sorted({b for r in self.policy.from_every_rank(blocked) for b in r})
        if due("probe", when, caching) and not blocked:
            with self.phase("probe"):
                probe = self.probe()
            consistency = None
            if due("calibration", when, caching):
                with self.phase("noise floors"):
                    floors = self.measure_floors(probe)
                self.calibrate(floors)
                consistency = self_consistency_check(floors.trainer_vs_itself, CAPS[self.calibration.dtype])
            checks += self._probe_checks(probe)
            if due("audits", when, caching):
                raw = facts is not None and not next(c for c in checks if c.name == "logprobs_mode").passed
                audits = self._audit_checks(probe, engine_ignores_t=raw)
                checks += audits[:2] + ([consistency] if consistency else []) + audits[2:]
            elif consistency:
                checks.append(consistency)
            if due("precise_probe", when, caching) and self.compute_dtype != "float32":
                why = self.precise_unavailable()
                if why:
                    precise = {"not_run": why}
                else:
                    with self.phase("fp32 probe"):
                        check, precise = self.precise_probe(probe)
                    checks.append(check)
                    if raw is False:  # the start gate's audits ran, with a temperature check the fp32 one can refine
                        checks = self._refine_temperature(checks, probe, check, precise)
            if due("routing", when, caching) and self.policy.routing is not None:
                if probe.routing is not None:
                    with self.phase("routing"):
                        checks.append(self._routing_check(probe))
                else:
                    checks.append(routing_unavailable_check(self.engine.routing_unavailable or "no routing reported",
                                                            self.policy.routing.replay))
            if due("extra", when, caching):
                checks += self.policy.extra_checks(probe)
        mismatch = dict(probe.stats.to_dict(), thresholds=self.thresholds) if probe else {}
        if probe is not None and precise is not None:
            mismatch["fp32_probe"] = precise
        if probe is not None and probe.routing is not None:
            mismatch["routing"] = probe.routing.get("figures", mismatch.get("routing"))
            checks = [self._routing_hint(c, mismatch["routing"]) for c in checks]
        report = GateReport(tuple(checks), mismatch, self.calibration.to_dict() if floors else None)
        reports = self.policy.from_every_rank(report)  # one verdict for all ranks: the first failing rank's report
        return GateRun(next((r for r in reports if not r.passed), report), probe, floors)

    @staticmethod
    def precise_temperature_due(probe: ProbeResult, precise: Check, figures: dict) -> bool:
        """Whether _refine_temperature runs: the fp32 probe failed at a config's T != 1 (then the twin at T = 1 says
        whether the gap is the temperature's). A clean gate pays nothing (at 0.5B in bf16 the twin's probe costs about
        40 s). At T = 1 never: a temperature applied twice or never changes nothing in such a run, and the bf16 check
        at ALT_TEMPERATURE names it as before."""
        return "thresholds" in figures and probe.temperature != 1.0 and not precise.passed

    def _refine_temperature(self, checks: list[Check], probe: ProbeResult, precise: Check, figures: dict):
        """The temperature check again on the fp32 twin, where bf16 noise cannot hide it (at the Qwen2.5-0.5B shape in
        bf16, a missing temperature moved the bf16 probe to 0.0996 against a 0.1 threshold; the fp32 probe saw it at
        4.4e6x): the twin at T = 1 against the fp32 probe at the config's T, judged by the fp32 probe's thresholds.
        Only where precise_temperature_due; its figures join `figures` (mismatch.fp32_probe.temperature). Returns
        `checks`, with the temperature check replaced by the fp32 one when that fails."""
        if not self.precise_temperature_due(probe, precise, figures):
            return checks
        with self.phase("fp32 second temperature"):
            at_one = self._twin_probe(probe.prompt_ids[:PRECISE_PROMPTS], 1.0)[3]
        fp32 = temperature_check(at_one, figures, probe.temperature, figures["thresholds"])
        fp32 = replace(fp32, detail="fp32 probe (both sides float32): " + fp32.detail)
        figures["temperature"] = fp32.measured
        return checks if fp32.passed else [fp32 if c.name == "temperature" else c for c in checks]

    def _routing_check(self, probe: ProbeResult) -> Check:
        """The probe's routing against the floor; with replay on, the probe scored again without replay gives the
        figures and the mismatch replay removes. The figures, floor and threshold join the report (mismatch.routing)."""
        figures = dict(probe.stats.routing)
        if self.policy.routing.replay:
            with self.policy.without_replay(), self.policy.at_temperature(probe.temperature):
                lps, _ = self.policy.score(probe.prompt_ids, probe.completion_ids)
            without = measure(lps, probe.engine_logprobs, probe.mask, self.policy.correction).stats
            figures["mismatch_without_replay"] = {k: without[k] for k in (MEAN, P99, MAX)}
            figures["mismatch_with_replay"] = {k: probe.stats[k] for k in (MEAN, P99, MAX)}
        limit, rule = routing_threshold(self.routing_floor, self.calibration.dtype)
        figures.update(floor=self.routing_floor, threshold=limit, threshold_rule=rule)
        probe.routing["figures"] = figures
        return routing_check(figures, self.routing_floor, self.calibration.dtype)

    def _routing_hint(self, check: Check, figures: dict) -> Check:
        """A failed mismatch check of an MoE probe whose routers disagreed somewhere, replay off: its fix names
        routing replay (a token sent to other experts on each side runs another computation)."""
        if check.name != "mismatch" or check.passed or self.policy.routing.replay or not figures.get(
                "flip_frac_token_layer"):
            return check
        return replace(check, fix=f"the engine and the trainer routed {figures['flip_frac_token_layer']:.2%} of the "
                                  f"probe's token-layers ({figures['flip_frac_token']:.2%} of its tokens) to other "
                                  "experts: set routing_replay: true so the trainer computes with the engine's experts; "
                                  "otherwise " + check.fix)

    def _probe_checks(self, probe: ProbeResult) -> list[Check]:
        """The probe's mismatch, non-finite and clip checks; with prefix caching on, the probe is re-measured on
        prompts whose prefix cannot be cached (first token changed): scoring clearly better there names the stale
        cache as the cause."""
        stats = probe.stats
        check = mismatch_check(stats, self.thresholds)
        checks = [check, non_finite_check(stats.n_nonfinite), clip_check(stats.clip_frac, self.args.max_clip_frac)]
        checks += [support_check(stats.n_outside_support, "probe")] if stats.n_outside_support else []
        if self.engine.settings.enable_prefix_caching:
            vocab = self.policy.vocab_size()
            self.fresh_shift = self.fresh_shift % (vocab - 1) + 1  # a new first token each time: never cached
            fresh = self.probe([[(p[0] + self.fresh_shift) % vocab] + p[1:] for p in probe.prompt_ids]).stats
            worse = (stats.mean_abs_logprob_diff > STALE_FACTOR * fresh.mean_abs_logprob_diff
                     and stats.mean_abs_logprob_diff - fresh.mean_abs_logprob_diff
                     > STALE_MIN_SHARE * self.thresholds[MEAN])
            if worse or (not check.passed and mismatch_check(fresh, self.thresholds).passed):
                checks.append(stale_cache_check(stats, fresh, STALE_FACTOR))
        return checks

    def _audit_checks(self, probe: ProbeResult, engine_ignores_t: bool) -> list[Check]:
        """The start gate's checks beyond the probe: a dry batch through TRL's `_generate` (token identity), the
        temperature applied once (a second probe, at T=1 or away from it) and the loss audit."""
        temp = self.policy.temperature
        with self.phase("second temperature"):
            if temp == 1.0:
                t, at_one, at_t = ALT_TEMPERATURE, probe.stats, self.probe(probe.prompt_ids, ALT_TEMPERATURE).stats
            else:
                t, at_one, at_t = temp, self.probe(probe.prompt_ids, 1.0).stats, probe.stats
        # in fp32 where the trainer can (fp32 weights under autocast): whether the weights reach the loss does not
        # depend on the dtype, and bf16 rounding of the backward bends the gradient's linearity past AUDIT_RTOL on
        # MoE models (tiny Qwen3-MoE bf16, aux loss on: 0.5-2.6% off; the same audit in fp32: 3e-5)
        fp32 = nullcontext() if self.policy.fp32_reference_unavailable() else self.policy.fp32_reference()
        with self.phase("loss audit"), fp32:
            losses, grads = self.policy.loss_audit(probe)
        with self.phase("dry batch through TRL's generation"):
            rows, sampled = self.policy.dry_batch()  # whole completions, as generated: no EOS masking yet
        return [self.token_identity(rows, sampled, "generation through TRL's _generate"),
                temperature_check(at_one, at_t, t, self.thresholds, engine_ignores_t),
                loss_audit_check(losses, grads, scales=AUDIT_SCALES,
                                 linear=self.policy.linear_loss(LINEAR_LOSS_TYPES))]

    def token_identity(self, rows, sampled: dict, label: str, eos_ids=()) -> Check:
        """token_identity over this rank's rows, counted over all ranks (audit.token_identity for the arguments)."""
        return token_identity_check(*self.policy.identity_counts(rows, sampled, eos_ids), label)

    def token_identity_of_batch(self, out: dict, sampled: dict, label: str) -> Check:
        """Every scored completion must hold the token ids the engine sampled for its prompt (model tokens only)."""
        cmask = out["completion_mask"].bool()
        width = cmask.size(1)
        scored = torch.where(cmask.any(1), width - cmask.flip(1).int().argmax(1), 0).tolist()  # last scored + 1
        prompts, pmask = out["prompt_ids"].tolist(), out["prompt_mask"].bool().tolist()  # one copy, not one per row
        completions = out["completion_ids"].tolist()
        tools = out["tool_mask"].bool().tolist() if "tool_mask" in out else None
        rows = []
        for i, n in enumerate(scored):
            if not n:  # nothing of this completion is scored (e.g. a masked truncated completion)
                continue
            prompt = [t for t, keep in zip(prompts[i], pmask[i]) if keep]
            rows.append((prompt, completions[i][:n], tools[i][:n] if tools else [True] * n))
        return self.token_identity(rows, sampled, label, self.policy.eos_token_ids())
