"""Statistics of multi-seed comparisons: mean and std over seeds, and differences paired by seed."""

from __future__ import annotations

import math
import statistics

from scipy.stats import t as student_t

CONFIDENCE = 0.95


def summary(values: list[float]) -> dict[str, float] | None:
    """Mean, sample std (n-1) and n of `values`; None for no values."""
    if not values:
        return None
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def paired_difference(values: dict[int, float], reference: dict[int, float]) -> dict | None:
    """`values - reference` paired by seed, over the seeds both have: the per-seed differences, their mean,
    sample std and a 95 % confidence interval of the mean (t distribution, n-1 degrees of freedom).

    `significant` is true only when the interval excludes 0; with one common seed there is no interval.
    """
    seeds = sorted(set(values) & set(reference))
    if not seeds:
        return None
    diffs = [values[s] - reference[s] for s in seeds]
    n, mean = len(diffs), statistics.mean(diffs)
    out = {"seeds": seeds, "per_seed": diffs, "mean": mean, "n": n, "std": None, "ci_low": None,
           "ci_high": None, "significant": False}
    if n > 1:
        std = statistics.stdev(diffs)
        half = student_t.ppf(0.5 + CONFIDENCE / 2, n - 1) * std / math.sqrt(n)
        out.update(std=std, ci_low=mean - half, ci_high=mean + half,
                   significant=bool(mean - half > 0 or mean + half < 0))
    return out


def verdict(diff: dict | None) -> str:
    """'better', 'worse', 'tie' (the interval contains 0) or 'one seed' (no interval yet)."""
    if diff is None or diff["ci_low"] is None:
        return "one seed"
    if not diff["significant"]:
        return "tie"
    return "better" if diff["mean"] > 0 else "worse"
