"""Statistics of timing samples: median and spread, and paired ratios.

The median (not the mean) is the figure of merit: a step time has a hard floor and a long
tail (a page fault, a preempted thread, another process on the machine), and the median
ignores the tail. The spread is the interquartile range; ``spread_pct`` is IQR / median.

Ratios between providers are taken per round and then the median of those is reported:
providers run interleaved (round r times every provider once), so a slow round (machine
drift, another process) slows all providers of that round alike and cancels in the ratio.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

__all__ = ["Summary", "summarize", "quantile", "paired_ratio"]


def quantile(sorted_xs: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default, "type 7") of sorted samples."""
    n = len(sorted_xs)
    if n == 0:
        raise ValueError("quantile of no samples")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile q={q} outside [0, 1]")
    pos = (n - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, n - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


@dataclass(frozen=True)
class Summary:
    n: int
    median: float
    mean: float
    stdev: float
    min: float
    max: float
    q25: float
    q75: float

    @property
    def iqr(self) -> float:
        return self.q75 - self.q25

    @property
    def spread_pct(self) -> float:
        """Interquartile range as a percentage of the median."""
        return 100.0 * self.iqr / self.median if self.median > 0 else float("nan")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["iqr"] = self.iqr
        d["spread_pct"] = self.spread_pct
        return d


def summarize(samples: Sequence[float]) -> Summary:
    xs = sorted(float(x) for x in samples)
    if not xs:
        raise ValueError("summarize: no samples")
    if any(math.isnan(x) for x in xs):
        raise ValueError("summarize: NaN sample")
    n = len(xs)
    mean = sum(xs) / n
    var = sum((x - mean) ** 2 for x in xs) / (n - 1) if n > 1 else 0.0
    return Summary(n=n, median=quantile(xs, 0.5), mean=mean, stdev=math.sqrt(var),
                   min=xs[0], max=xs[-1], q25=quantile(xs, 0.25), q75=quantile(xs, 0.75))


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """Median over rounds of numerator[r] / denominator[r].

    With numerator = baseline times and denominator = provider times this is the
    provider's speedup over the baseline (> 1: faster), robust to drift between rounds.
    """
    if len(numerator) != len(denominator):
        raise ValueError(f"paired_ratio: {len(numerator)} vs {len(denominator)} samples")
    ratios = sorted(a / b for a, b in zip(numerator, denominator) if b > 0)
    if not ratios:
        raise ValueError("paired_ratio: no pairs")
    return quantile(ratios, 0.5)
