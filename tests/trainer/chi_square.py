"""Pearson's chi-square goodness-of-fit test of sampled token counts against a distribution."""
from __future__ import annotations

import torch


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0) -> tuple[float, int]:
    """(p-value, degrees of freedom) of ``counts`` (V,) drawn from ``probs`` (V,): tokens whose expected
    count is below ``min_expected`` are pooled into one bin, so that the chi-square approximation holds.
    The p-value is the regularised upper incomplete gamma Q(df / 2, X^2 / 2), in float64."""
    counts, probs = counts.double(), probs.double()
    expected = probs / probs.sum() * counts.sum()
    large = expected >= min_expected
    observed_bins = torch.cat([counts[large], counts[~large].sum()[None]])
    expected_bins = torch.cat([expected[large], expected[~large].sum()[None]])
    if expected_bins[-1] < min_expected:  # too little pooled mass for a bin of its own: fold it in
        observed_bins[-2] += observed_bins[-1]
        expected_bins[-2] += expected_bins[-1]
        observed_bins, expected_bins = observed_bins[:-1], expected_bins[:-1]
    statistic = ((observed_bins - expected_bins) ** 2 / expected_bins).sum()
    df = len(expected_bins) - 1
    if df < 1:
        raise ValueError(f"probs: expected at least two bins of expected count >= {min_expected}, got {df + 1}")
    p_value = torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), statistic / 2)
    return float(p_value), df
