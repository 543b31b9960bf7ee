"""Statistics of multi-seed comparisons: mean and std over seeds, differences paired by seed, and the Holm
correction over a table's comparisons."""

from __future__ import annotations

import math
import statistics

from scipy.stats import t as student_t

CONFIDENCE = 0.95
FAMILY_ALPHA = 0.05  # family-wise error rate of a table's comparisons (Holm)


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
           "ci_high": None, "significant": False, "p_value": paired_p_value(diffs)}
    if n > 1:
        std = statistics.stdev(diffs)
        half = student_t.ppf(0.5 + CONFIDENCE / 2, n - 1) * std / math.sqrt(n)
        out.update(std=std, ci_low=mean - half, ci_high=mean + half,
                   significant=bool(mean - half > 0 or mean + half < 0))
    return out


def paired_p_value(diffs: list[float]) -> float | None:
    """Two-sided p-value of a paired t-test that the mean of the per-seed `diffs` is 0 (t = mean / (std / sqrt n),
    n-1 degrees of freedom); None with fewer than two. Differences all equal give 0 (1 when they are all 0)."""
    n = len(diffs)
    if n < 2:
        return None
    mean, std = statistics.mean(diffs), statistics.stdev(diffs)
    if std == 0:
        return 1.0 if mean == 0 else 0.0
    return float(2 * student_t.sf(abs(mean) / (std / math.sqrt(n)), n - 1))


def holm(p_values: dict[str, float | None], alpha: float = FAMILY_ALPHA) -> dict[str, bool | None]:
    """Holm-Bonferroni step-down over a family of comparisons: which null hypotheses are rejected with the
    family-wise error rate held at `alpha`. The k-th smallest of m p-values (k from 1) is compared with
    alpha / (m - k + 1); the first that is larger stops the procedure, and it and every larger one stand.
    A comparison without a p-value (None) is not in the family and gets None."""
    tested = sorted((p, label) for label, p in p_values.items() if p is not None)
    m = len(tested)
    out: dict[str, bool | None] = {label: None for label in p_values}
    rejecting = True
    for k, (p, label) in enumerate(tested):
        rejecting = rejecting and p <= alpha / (m - k)
        out[label] = rejecting
    return out


def holm_verdicts(diffs: dict[str, dict | None], alpha: float = FAMILY_ALPHA) -> dict[str, str | None]:
    """Per comparison: 'better' / 'worse' where Holm rejects a zero mean difference, else 'tie'; 'one seed'
    without a p-value; None where there is no comparison."""
    rejected = holm({k: d["p_value"] if d else None for k, d in diffs.items()}, alpha)
    out: dict[str, str | None] = {}
    for label, d in diffs.items():
        if d is None:
            out[label] = None
        elif rejected[label] is None:
            out[label] = "one seed"
        else:
            out[label] = ("better" if d["mean"] > 0 else "worse") if rejected[label] else "tie"
    return out


def verdict(diff: dict | None) -> str:
    """'better', 'worse', 'tie' (the interval contains 0) or 'one seed' (no interval yet)."""
    if diff is None or diff["ci_low"] is None:
        return "one seed"
    if not diff["significant"]:
        return "tie"
    return "better" if diff["mean"] > 0 else "worse"
