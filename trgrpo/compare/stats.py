"""The statistics of ``python -m trgrpo compare``: curves read from CSVLogger rows, per-run summaries, means
over seeds with Student t intervals, paired differences against a baseline.  Standard library only.

Confidence intervals are two-sided 95% Student t intervals over seeds: ``mean +- t(0.975, n-1) * s / sqrt(n)``
with ``s`` the sample standard deviation (n-1 denominator).  The t quantiles come from a table (df 1..30, 40,
60, 120, interpolated linearly in 1/df between them, the normal quantile beyond), so nothing needs scipy.

The x axis of every curve is the RL step: ``val/rl_step`` for held-out accuracy and ``train/rl_step`` for
training metrics, taken from the same row or, when logged in another row, from a row of the same ``step``.  A
run logged without those columns falls back to Lightning's ``step`` (optimiser updates, not RL steps).
"""

from __future__ import annotations

import csv
import math
import re
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

# t(0.975, df) for df = 1..30
_T975 = [
    12.706205,
    4.302653,
    3.182446,
    2.776445,
    2.570582,
    2.446912,
    2.364624,
    2.306004,
    2.262157,
    2.228139,
    2.200985,
    2.178813,
    2.160369,
    2.144787,
    2.131450,
    2.119905,
    2.109816,
    2.100922,
    2.093024,
    2.085963,
    2.079614,
    2.073873,
    2.068658,
    2.063899,
    2.059539,
    2.055529,
    2.051831,
    2.048407,
    2.045230,
    2.042272,
]
_T975_TAIL = [(30, 2.042272), (40, 2.021075), (60, 2.000298), (120, 1.979930), (math.inf, 1.959964)]
CI_METHOD = (
    "two-sided 95% Student t interval over seeds: mean +- t(0.975, n-1) * s / sqrt(n), s the sample "
    "standard deviation (n-1 denominator), n the number of seeds (or of seed pairs)"
)


def t_quantile_975(df: float) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (df >= 1)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= 30 and float(df).is_integer():
        return _T975[int(df) - 1]
    for (d0, t0), (d1, t1) in pairwise(_T975_TAIL):
        if d0 <= df <= d1:  # linear in 1/df, exact at the table's points
            u = (1 / d0 - 1 / df) / (1 / d0 - 1 / d1)
            return t0 + u * (t1 - t0)
    lo = int(df)  # a fractional df below 30
    return _T975[lo - 1] + (df - lo) * (_T975[lo] - _T975[lo - 1])


@dataclass(frozen=True)
class Interval:
    """Mean of ``n`` values with the half-width of its 95% t interval (nan when n < 2)."""

    mean: float
    half: float
    n: int

    @property
    def low(self) -> float:
        return self.mean - self.half

    @property
    def high(self) -> float:
        return self.mean + self.half

    def contains_zero(self) -> bool | None:
        """Whether 0 lies in the interval; None when there is no interval."""
        if self.n < 2 or math.isnan(self.half):
            return None
        return self.low <= 0 <= self.high

    def fmt(self, digits: int = 3, signed: bool = False) -> str:
        if self.n == 0 or math.isnan(self.mean):
            return "n/a"
        mean = f"{self.mean:+.{digits}f}" if signed else f"{self.mean:.{digits}f}"
        return mean if math.isnan(self.half) else f"{mean} ± {self.half:.{digits}f}"


def mean_ci(values: Iterable[float]) -> Interval:
    """Mean and 95% t half-width of the finite values (nan values are left out)."""
    vals = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return Interval(math.nan, math.nan, 0)
    mean = statistics.fmean(vals)
    if len(vals) < 2:
        return Interval(mean, math.nan, 1)
    half = t_quantile_975(len(vals) - 1) * statistics.stdev(vals) / math.sqrt(len(vals))
    return Interval(mean, half, len(vals))


def paired_differences(values: Mapping[int, float], baseline: Mapping[int, float]) -> dict[int, float]:
    """``values[s] - baseline[s]`` for every seed ``s`` both have (finite values only)."""
    return {
        s: values[s] - baseline[s]
        for s in sorted(values)
        if s in baseline and math.isfinite(values[s]) and math.isfinite(baseline[s])
    }


def noise_note(interval: Interval) -> str:
    inside = interval.contains_zero()
    if inside is None:
        return "no interval (fewer than 2 pairs)"
    if inside:
        return "inside the noise (interval contains 0)"
    return "higher than baseline" if interval.mean > 0 else "lower than baseline"


def normalised_auc(points: Sequence[tuple[float, float]]) -> float:
    """Trapezoid area under ``(x, y)`` divided by the x range: the mean of y over the curve."""
    pts = sorted(points)
    if not pts:
        return math.nan
    span = pts[-1][0] - pts[0][0]
    if span <= 0:
        return statistics.fmean(y for _, y in pts)
    area = sum((x1 - x0) * (y0 + y1) / 2 for (x0, y0), (x1, y1) in pairwise(pts))
    return area / span


def variation(values: Sequence[float]) -> dict[str, float]:
    """Mean and std over steps of a series and of its absolute step-to-step change ``|g_t - g_{t-1}|``."""
    vals = [v for v in values if math.isfinite(v)]
    jumps = [abs(b - a) for a, b in pairwise(vals)]

    def std(xs):
        return statistics.stdev(xs) if len(xs) > 1 else math.nan

    return {
        "mean": statistics.fmean(vals) if vals else math.nan,
        "std": std(vals),
        "change_mean": statistics.fmean(jumps) if jumps else math.nan,
        "change_std": std(jumps),
    }


# ------------------------------------------------------------------ metrics.csv


def _num(text) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def series(
    rows: Sequence[Mapping[str, str]], column: str, x_column: str
) -> tuple[list[tuple[float, float]], bool]:
    """``(x, value)`` of every row with ``column``, sorted by x, one point per x (the last logged wins).

    x is ``x_column`` from the row, else from a row of the same ``step`` that has it; rows without one are
    dropped.  Without any ``x_column`` value in the file, x is ``step``; the flag says which was used.
    """
    by_step = {r.get("step"): v for r in rows if (v := _num(r.get(x_column))) is not None}
    points: dict[float, float] = {}
    for r in rows:
        value = _num(r.get(column))
        if value is None:
            continue
        x = (
            (_num(r.get(x_column)) if r.get(x_column) not in (None, "") else by_step.get(r.get("step")))
            if by_step
            else _num(r.get("step"))
        )
        if x is not None:
            points[x] = value
    return sorted(points.items()), bool(by_step)


@dataclass
class RunCurves:
    """What one run's metrics.csv says: held-out accuracy and grad norm against the RL step, extra means."""

    accuracy: list[tuple[float, float]] = field(default_factory=list)
    grad_norm: list[tuple[float, float]] = field(default_factory=list)
    extras: dict[str, float] = field(default_factory=dict)
    rl_steps_axis: bool = True
    entropy: list[tuple[float, float]] = field(default_factory=list)
    non_finite: list[str] = field(default_factory=list)  # columns of NONFINITE_COLUMNS that held nan / inf

    @property
    def last_step(self) -> float:
        xs = [x for x, _ in self.accuracy[-1:] + self.grad_norm[-1:]]
        return max(xs) if xs else math.nan


EXTRA_PREFIXES = ("train/grad_share/", "train/token_share/", "train/weight/p", "train/weight/0")
"""Per-step diagnostics averaged over a run: the probability-bucket shares and mean weights
(trgrpo.diagnostics)."""


def bucket_order(column: str) -> tuple[str, float]:
    """Sort key of a bucket column: its family, then the bucket's lower edge (``p<0.1`` first)."""
    family, _, bucket = column.rpartition("/")
    if bucket.startswith("p<"):
        return family, -1.0
    edge = bucket.split("<=p")[0] if "<=p" in bucket else bucket.removeprefix("p>=")
    try:
        return family, float(edge)
    except ValueError:
        return family, math.inf


def read_curves(path: str | Path) -> RunCurves:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return curves_from_rows(rows)


def curves_from_rows(rows: Sequence[Mapping[str, str]]) -> RunCurves:
    acc, val_axis = series(rows, "val/accuracy", "val/rl_step")
    grad, train_axis = series(rows, "train/grad_norm", "train/rl_step")
    columns = list(dict.fromkeys(k for r in rows for k in r))
    extras = {}
    for col in columns:
        if col.startswith(EXTRA_PREFIXES):
            vals = [v for r in rows if (v := _num(r.get(col))) is not None]
            if vals:
                extras[col] = statistics.fmean(vals)
    entropy, _ = series(rows, "train/entropy", "train/rl_step")
    bad = [c for c in NONFINITE_COLUMNS if any(_not_finite(r.get(c)) for r in rows)]
    axis = (val_axis or not acc) and (train_axis or not grad)
    return RunCurves(acc, grad, extras, rl_steps_axis=axis, entropy=entropy, non_finite=bad)


def _not_finite(text) -> bool:
    try:
        return not math.isfinite(float(text))
    except (TypeError, ValueError):
        return False  # empty: not logged in this row


def summarise(curves: RunCurves) -> dict[str, float]:
    """Per-run numbers: final, best and area-normalised held-out accuracy, grad-norm statistics, extras."""
    accs = [a for _, a in curves.accuracy]
    grad = variation([g for _, g in curves.grad_norm])
    out = {
        "final_accuracy": accs[-1] if accs else math.nan,
        "best_accuracy": max(accs) if accs else math.nan,
        "accuracy_auc": normalised_auc(curves.accuracy),
        "grad_norm_mean": grad["mean"],
        "grad_norm_std": grad["std"],
        "grad_change_mean": grad["change_mean"],
        "grad_change_std": grad["change_std"],
        "rl_steps": curves.last_step,
        # step-to-step change relative to the norm itself: a weighting that scales every weight up (TR-GRPO's
        # w in [1, 1.4]) raises both, so only this ratio says whether the norm is smoother
        "grad_change_relative": grad["change_mean"] / grad["mean"] if grad["mean"] else math.nan,
    }
    out.update(stability(curves))
    out.update(curves.extras)
    return out


# ------------------------------------------------------------------ stability (docs/compare.md, "Stability")

SPIKE_FACTOR = 5.0
"""A step is a grad-norm spike when its pre-clip norm exceeds this many times the run's median."""
ENTROPY_COLLAPSE = 0.02
"""A run collapsed when its policy entropy at the end is below this many nats per token: the policy samples
nearly the same token every time, exploration is gone.  (A fraction of the start's entropy misfires on a
pretrained model that learns a fixed answer format: SmolLM2 runs that went from 0.24 to 0.68 held-out accuracy
ended at 0.05-0.10 nats, under a tenth of their start.)"""
EDGE_FRACTION = 0.1
"""The start and the end of a run, for the entropy ratio: the first and the last tenth of its logged steps
(at least one step each)."""
NONFINITE_COLUMNS = ("train/loss", "train/grad_norm")
NONFINITE_ERROR = re.compile(r"\b(nan|inf)\b", re.IGNORECASE)
"""A failed run whose stderr says this ended on non-finite numbers (torch.multinomial's "probability tensor
contains either inf, nan or element < 0", for one): it collapsed."""


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) with linear interpolation between order statistics (numpy's default)."""
    vals = sorted(values)
    if not vals:
        return math.nan
    pos = q * (len(vals) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(vals) - 1)
    return vals[lo] + (pos - lo) * (vals[hi] - vals[lo])


def max_drop(values: Sequence[float]) -> float:
    """The largest fall from an earlier value to a later one (0 when the series never falls)."""
    best, drop = -math.inf, 0.0
    for v in values:
        best = max(best, v)
        drop = max(drop, best - v)
    return drop if values else math.nan


def stability(curves: RunCurves) -> dict[str, float | str]:
    """Per-run stability measures and the collapse verdict (``collapsed`` 1.0 / 0.0, ``collapse_reason``)."""
    grads = [g for _, g in curves.grad_norm]
    median = statistics.median(grads) if grads else math.nan
    ent = [e for _, e in curves.entropy]
    k = max(1, int(len(ent) * EDGE_FRACTION))
    start, end = (statistics.fmean(ent[:k]), statistics.fmean(ent[-k:])) if ent else (math.nan, math.nan)
    ratio = end / start if ent and start > 0 else math.nan
    accs = [a for _, a in curves.accuracy]
    reasons = []
    if curves.non_finite:
        reasons.append("non-finite " + " / ".join(curves.non_finite))
    if len(accs) >= 2 and accs[-1] < accs[0]:
        reasons.append(f"final held-out accuracy {accs[-1]:.3f} below the start's {accs[0]:.3f}")
    if end < ENTROPY_COLLAPSE:
        reasons.append(f"entropy fell to {end:.4f} nats per token (start {start:.3f})")
    return {
        "grad_norm_peak": max(grads) if grads else math.nan,
        "grad_norm_p95": percentile(grads, 0.95),
        "grad_spikes": float(sum(g > SPIKE_FACTOR * median for g in grads)) if grads else math.nan,
        "entropy_ratio": ratio,
        "accuracy_max_drop": max_drop(accs),
        "collapsed": 1.0 if reasons else 0.0,
        "collapse_reason": "; ".join(reasons),
    }


def failed_collapse(stderr_tail: str) -> str:
    """The collapse reason of a failed run whose error names non-finite numbers, else ''."""
    return "failed on non-finite numbers" if NONFINITE_ERROR.search(stderr_tail or "") else ""


def band(curves: Sequence[Sequence[tuple[float, float]]]) -> list[tuple[float, float, float, int]]:
    """Across runs, at every x any run has: (x, mean, standard error of the mean (nan for one run), runs)."""
    at: dict[float, list[float]] = {}
    for curve in curves:
        for x, y in curve:
            at.setdefault(x, []).append(y)
    out = []
    for x in sorted(at):
        ys = at[x]
        se = statistics.stdev(ys) / math.sqrt(len(ys)) if len(ys) > 1 else math.nan
        out.append((x, statistics.fmean(ys), se, len(ys)))
    return out


def smooth(values: Sequence[float], window: int) -> list[float]:
    """Centred moving average over ``window`` points (odd; shrunk at the ends); window 1 returns a copy."""
    half = max(window, 1) // 2
    return [statistics.fmean(values[max(0, i - half) : i + half + 1]) for i in range(len(values))]
