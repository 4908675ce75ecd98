"""The records that cross parts: mismatch statistics, noise floors, step records, failures and resumes.

Every statistic's name is defined here once (`MEAN`, `P99`, `MAX`, `K3`, the field names below) and is the key of the
JSON the records become (`to_dict()`: correctness_report.json, checkpoints, the certificate). The package reads
fields as attributes (a typo fails where it is written); `record["name"]` reads the same value by its JSON key, for
reports and tests that hold the JSON form. Pure Python: nothing here knows torch, vLLM or TRL.
"""

from dataclasses import asdict, dataclass, field, fields

MEAN, P99, MAX, K3 = "mean_abs_logprob_diff", "p99_abs_logprob_diff", "max_abs_logprob_diff", "kl_k3"
GAP_KEYS = (MEAN, P99, MAX, K3, "ratio_outside_frac", "n_tokens", "n_nonfinite")  # a summary of gaps
# importance-ratio diagnostics, before truncation or masking (core/numerics.ratio_stats)
RATIO_KEYS = ("ratio_min", "ratio_p1", "ratio_p99", "ratio_max", "tokens_outside_0.5_2", "tokens_outside_0.8_1.25",
              "seqs_outside_0.5_2", "seqs_outside_0.8_1.25", "masked_frac")
# logged per training batch as correct/<name> (ratios as correct/ratio/<name without ratio_>)
METRIC_KEYS = (MEAN, P99, MAX, K3, "clip_frac", "ess", *RATIO_KEYS)
# mixture-of-experts models: the routing figures of a batch, logged as correct/routing/<name> (numerics.routing_flips)
ROUTING_METRIC_KEYS = ("flip_frac_token_layer", "flip_frac_token")


class Record:
    """JSON form and read-by-key access shared by the records below."""

    def to_dict(self) -> dict:
        return asdict(self)

    def __getitem__(self, key: str):
        d = self.to_dict()
        if key not in d:
            raise KeyError(f"{type(self).__name__} has no {key!r} (fields: {', '.join(d)})")
        return d[key]

    def get(self, key: str, default=None):
        return self.to_dict().get(key, default)

    def __contains__(self, key: str) -> bool:
        return key in self.to_dict()

    @classmethod
    def from_dict(cls, d: dict):
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass(frozen=True)
class MismatchStats(Record):
    """numerics.measure's statistics of one probe or training batch (trainer vs engine logprobs)."""

    mean_abs_logprob_diff: float = 0.0
    p99_abs_logprob_diff: float = 0.0
    max_abs_logprob_diff: float = 0.0
    kl_k3: float = 0.0
    ratio_outside_frac: float = 0.0
    n_tokens: int = 0
    n_nonfinite: int = 0
    n_outside_support: int = 0
    clip_frac: float = 0.0
    ess: float = 1.0
    ratios: dict = field(default_factory=dict)  # RATIO_KEYS -> value
    routing: dict | None = None  # MoE: the routing figures of the same tokens (engine vs trainer experts); dense: None

    @classmethod
    def of(cls, flat: dict) -> "MismatchStats":
        """From numerics.measure's flat dict."""
        names = {f.name for f in fields(cls)} - {"ratios"}
        return cls(**{k: flat[k] for k in names if k in flat}, ratios={k: flat[k] for k in RATIO_KEYS if k in flat})

    def to_dict(self) -> dict:
        d = asdict(self)
        out = {**{k: v for k, v in d.items() if k not in ("ratios", "routing")}, **d["ratios"]}
        return {**out, "routing": d["routing"]} if d["routing"] is not None else out


@dataclass(frozen=True)
class Floors(Record):
    """The noise floors thresholds are calibrated from (core/calibrate.py): each a gap summary (GAP_KEYS), or a
    string saying why it could not be measured here; None when not measured."""

    trainer_vs_itself: dict | str | None = None
    dtype_rounding: dict | str | None = None
    fp32_rounding: dict | str | None = None  # a float32 trainer against itself in float64 (the precision floor)
    engine_vs_itself: dict | str | None = None  # the doctor's --calibrate only

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def __bool__(self) -> bool:
        return bool(self.to_dict())

    def items(self):
        return self.to_dict().items()

    @classmethod
    def max_over(cls, per_rank: list[dict]) -> "Floors":
        """One set of floors from every rank's: each statistic's maximum, token counts added; a string (not
        measurable) only where no rank measured it."""
        merged: dict = {}
        for rank_floors in per_rank:
            for name, f in rank_floors.items():
                old = merged.get(name)
                if not isinstance(f, dict) or not isinstance(old, dict):
                    merged[name] = f if old is None or isinstance(f, dict) else old
                else:
                    merged[name] = {k: (old[k] + f[k] if k in ("n_tokens", "n_nonfinite") else max(old[k], f[k]))
                                    if isinstance(f.get(k), (int, float)) else f[k] for k in f}
        return cls(**merged)


@dataclass(frozen=True)
class StepRecord(Record):
    """One training batch: whether TIS was on and the gate held, its mismatch and ratio figures, TRL's reward and
    completion length."""

    step: int
    tis_enabled: bool
    gate_passed: bool
    metrics: dict  # METRIC_KEYS -> value
    n_tokens: int = 0
    n_nonfinite: int = 0
    reward: float | None = None
    completion_length: float | None = None
    routing: dict | None = None  # MoE: the batch's routing figures (numerics.routing_flips, replay); dense: None

    @classmethod
    def of(cls, step: int, stats: MismatchStats, tis_enabled: bool, gate_passed: bool, reward: float | None = None,
           completion_length: float | None = None) -> "StepRecord":
        flat = stats.to_dict()
        return cls(step, tis_enabled, gate_passed, {k: flat[k] for k in METRIC_KEYS}, stats.n_tokens,
                   stats.n_nonfinite, reward, completion_length, stats.routing)

    def metrics_to_log(self) -> list[tuple[str, float]]:
        """(name, value) of what is logged every batch: correct/gate_passed, correct/tis_enabled, correct/<statistic>
        and correct/ratio/<ratio without ratio_>; MoE: correct/routing/<ROUTING_METRIC_KEYS>."""
        d = self.to_dict()
        out = [(f"correct/ratio/{k.removeprefix('ratio_')}" if k in RATIO_KEYS else f"correct/{k}", float(d[k]))
               for k in ("gate_passed", "tis_enabled", *METRIC_KEYS)]
        return out + [(f"correct/routing/{k}", float(self.routing[k])) for k in ROUTING_METRIC_KEYS
                      if self.routing and k in self.routing]

    def to_dict(self) -> dict:
        d = {"step": self.step, "tis_enabled": self.tis_enabled, "gate_passed": self.gate_passed, **self.metrics,
             "n_tokens": self.n_tokens, "n_nonfinite": self.n_nonfinite}
        d.update({k: v for k, v in (("reward", self.reward), ("completion_length", self.completion_length),
                                    ("routing", self.routing)) if v is not None})
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "StepRecord":
        return cls(d["step"], d["tis_enabled"], d["gate_passed"], {k: d[k] for k in METRIC_KEYS if k in d},
                   d.get("n_tokens", 0), d.get("n_nonfinite", 0), d.get("reward"), d.get("completion_length"),
                   d.get("routing"))


@dataclass
class Failure(Record):
    """A failed gate: the optimizer step, when (before training / after a sync / on a batch), the report, and the
    checkpoint saved before stopping (enforce)."""

    step: int
    when: str
    report: dict  # GateReport.to_dict()
    checkpoint: str | None = None

    def to_dict(self) -> dict:
        return {"step": self.step, "when": self.when, **self.report,
                **({"checkpoint": self.checkpoint} if self.checkpoint else {})}

    @classmethod
    def from_dict(cls, d: dict) -> "Failure":
        report = {k: v for k, v in d.items() if k not in ("step", "when", "checkpoint")}
        return cls(d["step"], d["when"], report, d.get("checkpoint"))


@dataclass(frozen=True)
class Resume(Record):
    """A resume: the checkpoint, the step it was saved at, and its gate verdict and TIS state then; `changed`: the
    settings the gate compares that differ from the checkpoint's ({"<side> <fact>": {"saved", "now"}}), if any."""

    source: str
    step: int | None
    saved_gate: str | None
    saved_tis_enabled: bool | None
    changed: dict | None = None

    def to_dict(self) -> dict:
        return {"from": self.source, "step": self.step, "saved_gate": self.saved_gate,
                "saved_tis_enabled": self.saved_tis_enabled, **({"changed": self.changed} if self.changed else {})}

    @classmethod
    def from_dict(cls, d: dict) -> "Resume":
        return cls(d["from"], d.get("step"), d.get("saved_gate"), d.get("saved_tis_enabled"), d.get("changed"))
