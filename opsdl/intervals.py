"""95% intervals for evaluation scores: of a mean score (Wilson), and of a paired difference of two
models' scores on the same samples."""
from __future__ import annotations

import math
from typing import Sequence

Z95 = 1.96  # the two-sided 95% normal quantile, to the precision results are shown at


def wilson_interval(hits: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion ``hits / n`` (sound at 0 and n, unlike p +- 2 SE).
    ``hits`` may be fractional: for scores in [0, 1] (RULER's partial credit) it is the interval of
    their mean, conservative since such scores vary at most as much as 0/1 ones of the same mean."""
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(max(p * (1 - p), 0.0) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_difference(scores: Sequence[float], baseline: Sequence[float], z: float = Z95) -> tuple[float, float, float]:
    """(mean, low, high) of ``scores - baseline`` over the same samples: the normal interval of a
    paired mean difference, mean +- z * sd / sqrt(n) (sd: the sample standard deviation of the
    differences; 0 when every difference is equal, then the interval is the point)."""
    if len(scores) != len(baseline) or not scores:
        raise ValueError(f"scores: expected as many scores as the baseline's, and at least one, got {len(scores)} "
                         f"and {len(baseline)}")
    diffs = [a - b for a, b in zip(scores, baseline)]
    n, mean = len(diffs), sum(diffs) / len(diffs)
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1)) if n > 1 else 0.0
    half = z * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def sign_test(scores: Sequence[float], baseline: Sequence[float]) -> float:
    """The two-sided exact sign test of ``scores`` against ``baseline`` on the same samples: with k
    samples that differ, m of them up, p = min(1, 2 * P(Binomial(k, 1/2) <= min(m, k - m))); 1 when
    none differ. Unlike a normal interval it does not call 4 equal gains out of 4 certain (p = 0.125)."""
    ups = sum(a > b for a, b in zip(scores, baseline))
    downs = sum(a < b for a, b in zip(scores, baseline))
    k = ups + downs
    if k == 0:
        return 1.0
    tail = sum(math.comb(k, i) for i in range(min(ups, downs) + 1)) / 2 ** k
    return min(1.0, 2 * tail)


def with_interval(scores: list[float], counts: list[int]) -> str:
    """Pooled mean score over cells (each a mean over its ``counts`` samples) and its 95% interval:
    '0.78 [0.63, 0.88]'."""
    hits, n = sum(a * c for a, c in zip(scores, counts)), sum(counts)
    low, high = wilson_interval(hits, n)
    return f"{hits / n:.2f} [{low:.2f}, {high:.2f}]"
