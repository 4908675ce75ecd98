"""Mismatch thresholds derived from noise floors measured on this model, dtype and machine.

A healthy engine differs from the trainer by numerical noise whose size depends on the model (how peaked its logits
are), the dtype and the kernels, so one fixed threshold per dtype is either too loose (a fault that moves the gap a
few-fold passes) or too tight (a peaked model false-alarms). Before step 0 the gate measures *floors* on the
trainer alone: its logprobs of the probe batch scored whole vs one sequence at a time (`trainer_vs_itself`), and, in
bf16/fp16 with fp32 weights, scored under autocast vs in fp32 (`dtype_rounding`). Neither involves the engine, so
a broken engine cannot loosen its own thresholds. The rule, per statistic s:

    threshold[s] = min(CAPS[dtype][s], max(FACTOR[s] x floor[s], MINIMUMS[dtype][s]))

floor[s] is the larger of the measured floors. FACTOR: 4 for mean and p99 |Δlogp|, 16 (= 4²) for k3 KL, which
grows with the square of the gap. Measured healthy gap / floor (probe, CPU): tiny fp32 1.2-1.3 (mean), 0.9-1.2
(p99); tiny bf16 1.3-1.6 (mean), 0.9-1.5 (p99), 1.8-2.8 (k3); Qwen2.5-0.5B shape bf16 1.25 / 1.14 / 1.4 — so 4 leaves
>= 2.5x headroom (k3: >= 5.7x) and a fault that moves the gap 3-4x fails. MINIMUMS: below them a difference is at
the dtype's resolution (bf16: 2^-8 relative) or within what vLLM's kernels are measured to differ from HF's in fp32
(CPU at vocab 151,936: 5.8e-5 mean, batches up to 1.2e-4; H100: 6.1e-4 mean). In float32 on a CPU the fp32
rounding against float64 is measured instead (`PRECISION_FLOOR`), and only the tiny `PRECISION_MINIMUMS` remain.
CAPS: values no healthy run reached on any model measured (docs/BENCHMARKS.md); a large floor never lifts a threshold
past them. The max |Δlogp| grows with the number of tokens scored, so it is never calibrated: it only alarms above the
catastrophic cap.

Thresholds the user sets win. Where no floor can be measured (calibrate: false, no probe tokens) the fixed per-dtype
values of `FIXED` are used, and the table says so. Pure: no torch, vLLM or TRL.
"""

from dataclasses import asdict, dataclass

# Decided on every probe and batch; each is stable as the token count grows.
CALIBRATED = ("mean_abs_logprob_diff", "p99_abs_logprob_diff", "kl_k3")
CAP_ONLY = "max_abs_logprob_diff"  # grows with the token count: a catastrophic cap only
DECIDING = (*CALIBRATED, CAP_ONLY)
FACTOR = {"mean_abs_logprob_diff": 4.0, "p99_abs_logprob_diff": 4.0, "kl_k3": 16.0}
FLOOR_NAMES = {"trainer_vs_itself": "trainer vs itself (micro-batch vs 1)",
               "dtype_rounding": "trainer at its compute dtype vs in fp32",
               "fp32_rounding": "trainer's scoring and a plain fp32 forward vs in fp64"}
# The precision floor: the rounding of two fp32 implementations (TRL's scoring and a plain fp32 forward) against
# float64 on the probe, the larger (gate.precision_floor). vLLM's fp32 kernels differ from HF's by rounding of that
# size (CPU, measured: tiny 9.0e-7 mean against the engine's 9e-7; vocab 151,936: 5.0e-5 against 4.6e-5), so where
# it is measured the fixed float32 minimum (set for the worst model seen) gives way to these absolute ones, which only
# keep a nil floor from making a zero threshold. Not on a GPU ("float32@cuda"): vLLM's GPU fp32 kernels (6.1e-4 mean on
# an H100) are not measured against it yet.
PRECISION_FLOOR = "fp32_rounding"
# The precision floor is measured on the probe's short completions; training batches (longer, after updates) sat up
# to 2.9x above it at vocab 151,936 (tiny-v152k: probe 4.6e-5, batches to 1.33e-4, floor 4.6e-5), so its factor is
# doubled (mean and p99 8x, k3 64x).
WIDEN = {PRECISION_FLOOR: 2.0}
PRECISION_MINIMUMS = {"float32": dict(mean_abs_logprob_diff=1e-6, p99_abs_logprob_diff=5e-6, kl_k3=1e-12)}

# Per compute dtype ("float32@cuda" on a GPU, where vLLM's fp32 kernels differ more from HF's).
MINIMUMS = {
    "float32": dict(mean_abs_logprob_diff=5e-4, p99_abs_logprob_diff=2e-3, kl_k3=1e-6),
    "float32@cuda": dict(mean_abs_logprob_diff=2e-3, p99_abs_logprob_diff=1.5e-2, kl_k3=1e-5),
    "bfloat16": dict(mean_abs_logprob_diff=2e-3, p99_abs_logprob_diff=1e-2, kl_k3=1e-5),
    "float16": dict(mean_abs_logprob_diff=5e-4, p99_abs_logprob_diff=2.5e-3, kl_k3=1e-6),
}
# Healthy maxima measured: fp32 CPU mean 1.2e-4, H100 6.1e-4 (max 5.8e-3); bf16 H100 small Qwen2 mean 0.011 / k3 2e-4 /
# max 0.18, Qwen2.5-0.5B shape on CPU mean 0.048 / p99 0.29 / k3 0.003 / max 0.49. Faults: raw logprobs at T=0.7
# mean 0.16-0.28, a skipped sync 0.147, temperature applied twice 0.164.
CAPS = {
    "float32": dict(mean_abs_logprob_diff=5e-3, p99_abs_logprob_diff=2e-2, kl_k3=5e-5, max_abs_logprob_diff=0.1),
    "float32@cuda": dict(mean_abs_logprob_diff=5e-3, p99_abs_logprob_diff=2e-2, kl_k3=5e-5, max_abs_logprob_diff=0.1),
    "bfloat16": dict(mean_abs_logprob_diff=0.1, p99_abs_logprob_diff=1.0, kl_k3=0.02, max_abs_logprob_diff=5.0),
    "float16": dict(mean_abs_logprob_diff=0.05, p99_abs_logprob_diff=0.5, kl_k3=5e-3, max_abs_logprob_diff=3.0),
}
# The fallback where no floor is measured: the values the gate used before calibration (max: the cap).
FIXED = {
    "float32": dict(mean_abs_logprob_diff=5e-4, p99_abs_logprob_diff=2e-3, kl_k3=1e-6, max_abs_logprob_diff=0.1),
    "float32@cuda": dict(mean_abs_logprob_diff=2e-3, p99_abs_logprob_diff=1.5e-2, kl_k3=1e-5, max_abs_logprob_diff=0.1),
    "bfloat16": dict(mean_abs_logprob_diff=0.05, p99_abs_logprob_diff=0.5, kl_k3=2e-3, max_abs_logprob_diff=5.0),
    "float16": dict(mean_abs_logprob_diff=0.02, p99_abs_logprob_diff=0.25, kl_k3=1e-3, max_abs_logprob_diff=3.0),
}


def dtype_key(compute_dtype: str, on_gpu: bool) -> str:
    key = f"{compute_dtype}@cuda" if on_gpu and compute_dtype == "float32" else compute_dtype
    return key if key in CAPS else "bfloat16"


@dataclass(frozen=True)
class Threshold:
    value: float
    source: str  # calibrated | minimum | cap | fixed | user | bit_exact
    rule: str  # how the value was reached, in words
    floor: float | None = None


@dataclass(frozen=True)
class Calibration:
    """The thresholds the gate decides with, and where each came from."""

    thresholds: dict  # statistic -> Threshold, in DECIDING order
    floors: dict  # floor name -> its statistics (or a reason string when it was not measured)
    dtype: str

    def values(self) -> dict:
        return {k: t.value for k, t in self.thresholds.items()}

    @property
    def summary(self) -> str:
        sources = {t.source for k, t in self.thresholds.items() if k != CAP_ONLY}
        if sources <= {"calibrated", "minimum", "cap"}:
            return f"calibrated from measured floors, {self.dtype}"
        if sources == {"fixed"}:
            return f"fixed {self.dtype} values: no floor measured"
        return f"{', '.join(sorted(sources))}; {self.dtype}"

    def to_dict(self) -> dict:
        return {"summary": self.summary, "dtype": self.dtype, "floors": self.floors,
                "thresholds": {k: asdict(t) for k, t in self.thresholds.items()}}


def _floor(floors: dict, stat: str) -> tuple[float, float, str] | None:
    """(factor x floor, factor, floor, name) of the measured floor of `stat` that gives the largest threshold; None
    when no floor was measured. The factor is FACTOR[stat], widened for the precision floor (WIDEN)."""
    measured = []
    for name, f in floors.items():
        if isinstance(f, dict) and f.get("n_tokens"):
            k = FACTOR[stat] * WIDEN.get(name, 1.0) ** (2 if stat == "kl_k3" else 1)
            measured.append((k * f[stat], k, f[stat], name))
    return max(measured) if measured else None


def calibrate(floors: dict, compute_dtype: str, on_gpu: bool = False, user: dict | None = None,
              bit_exact: bool = False) -> Calibration:
    """Thresholds by the module's rule. `floors`: {name: mismatch statistics (numerics.summarize_gaps) or a string
    saying why it was not measured}; an empty dict means calibration is off. `user`: thresholds the user set
    ({statistic: value}); they win."""
    key = dtype_key(compute_dtype, on_gpu)
    user = {k: v for k, v in (user or {}).items() if v is not None}
    measured = floors.get(PRECISION_FLOOR)
    precise = key in PRECISION_MINIMUMS and isinstance(measured, dict) and bool(measured.get("n_tokens"))
    out = {}
    for stat in DECIDING:
        cap = CAPS[key][stat]
        if bit_exact:
            out[stat] = Threshold(0.0, "bit_exact", "bit_exact: equal or fail")
        elif stat in user:
            out[stat] = Threshold(float(user[stat]), "user", "set in the config")
        elif stat == CAP_ONLY:
            out[stat] = Threshold(cap, "cap", f"catastrophic cap for {key} (grows with the token count: never "
                                              "calibrated)")
        elif (found := _floor(floors, stat)) is None:
            why = "calibration off" if not floors else "no floor measured"
            out[stat] = Threshold(FIXED[key][stat], "fixed", f"fixed {key} value ({why})")
        else:
            derived, factor, floor, name = found
            lo = PRECISION_MINIMUMS[key][stat] if precise else MINIMUMS[key][stat]
            value, source = derived, "calibrated"
            if derived < lo:
                value, source = lo, "minimum"
            elif derived > cap:
                value, source = cap, "cap"
            rule = f"{factor:g} x floor {floor:.3g} ({name})"
            if source == "minimum":
                rule += f" = {derived:.3g}, raised to the {key} {'precision ' if precise else ''}minimum"
            elif source == "cap":
                rule += f" = {derived:.3g}, lowered to the {key} cap"
            out[stat] = Threshold(value, source, rule, floor)
    return Calibration(out, dict(floors), key)
