"""Paired t-test p-values and the Holm correction of a suite table's comparisons, against hand computations."""

import json
import math

import pytest

from distillab.bench.stats import holm, holm_verdicts, paired_difference, paired_p_value, verdict
from distillab.bench.suite import Suite, aggregate, write_results

T_975_4 = 2.776445105  # Student's t, 97.5 % quantile, 4 degrees of freedom (printed tables): two-sided p 0.05
T_995_4 = 4.604094871  # ... 99.5 % quantile: two-sided p 0.01

PATTERN = [-0.2, -0.1, 0.0, 0.1, 0.2]  # the per-seed spread of every row: std sqrt(0.1 / 4) = 0.1581
REFERENCE = {seed: 90.0 for seed in range(5)}
MEANS = {"a": -0.70, "b": 0.23, "c": 0.21}  # mean differences to the reference


def t_cdf_4(t: float) -> float:
    """Student's t CDF with 4 degrees of freedom in closed form: 1/2 + 3u/4 - u^3/4, u = t / sqrt(4 + t^2)."""
    u = t / math.sqrt(4 + t * t)
    return 0.5 + 0.75 * u - 0.25 * u**3


def hand_p(mean: float) -> float:
    std = math.sqrt(sum(x * x for x in PATTERN) / 4)
    t = mean / (std / math.sqrt(5))
    return 2 * (1 - t_cdf_4(abs(t)))


def rows() -> dict[str, dict[int, float]]:
    return {label: {seed: 90.0 + mean + PATTERN[seed] for seed in range(5)} for label, mean in MEANS.items()}


def test_the_closed_form_matches_the_printed_table():
    assert 2 * (1 - t_cdf_4(T_975_4)) == pytest.approx(0.05, abs=1e-9)
    assert 2 * (1 - t_cdf_4(T_995_4)) == pytest.approx(0.01, abs=1e-9)


def test_paired_p_value_matches_a_hand_computation():
    # t = mean / (0.1581 / sqrt 5): a -9.90, b 3.25, c 2.97
    expected = {"a": 0.000585, "b": 0.0313, "c": 0.0412}  # from t_cdf_4, rounded
    for label, values in rows().items():
        d = paired_difference(values, REFERENCE)
        assert d["p_value"] == pytest.approx(hand_p(MEANS[label]), rel=1e-6)
        assert d["p_value"] == pytest.approx(expected[label], rel=2e-3)
    # at the table's quantile the p-value is 0.05, where the 95 % interval just touches 0
    diffs = [x + T_975_4 * math.sqrt(0.025) / math.sqrt(5) for x in PATTERN]
    assert paired_p_value(diffs) == pytest.approx(0.05, rel=1e-6)
    assert paired_p_value([0.5]) is None
    assert paired_p_value([0.3, 0.3, 0.3]) == 0.0 and paired_p_value([0.0, 0.0]) == 1.0


def test_holm_steps_down_and_stops_at_the_first_p_value_above_its_threshold():
    diffs = {label: paired_difference(values, REFERENCE) for label, values in rows().items()}
    # By hand, m = 3: sorted p 0.0006 (a) <= 0.05/3 = 0.0167: rejected; 0.0313 (b) > 0.05/2 = 0.025: stop, so b
    # and c (0.0412, which alone would pass 0.05/1) both stand.
    assert holm({k: d["p_value"] for k, d in diffs.items()}) == {"a": True, "b": False, "c": False}
    # Uncorrected, each 95 % interval excludes 0 (p < 0.05): b and c look better than the reference; Holm: tie
    assert [verdict(diffs[k]) for k in "abc"] == ["worse", "better", "better"]
    assert holm_verdicts(diffs) == {"a": "worse", "b": "tie", "c": "tie"}
    # every step passes: 0.001 <= 0.0167, 0.02 <= 0.025, 0.04 <= 0.05
    assert holm({"x": 0.04, "y": 0.001, "z": 0.02}) == {"x": True, "y": True, "z": True}
    # a comparison without a p-value (one seed) is outside the family: m = 2, so 0.03 > 0.05/2 stops at once
    assert holm({"x": 0.03, "y": None, "z": 0.04}) == {"x": False, "y": None, "z": False}
    assert holm({"x": 0.03, "y": None}) == {"x": True, "y": None}  # m = 1: 0.03 <= 0.05
    assert holm({"x": 0.03}, alpha=0.01) == {"x": False}
    single = paired_difference({0: 91.0}, {0: 90.0})
    assert holm_verdicts({"one": single, "none": None}) == {"one": "one seed", "none": None}


def _summary(label: str, seed: int, acc: float) -> dict:
    return {"seed": seed, "test_acc": acc, "val_acc": acc, "best_epoch_test_acc": acc, "images_per_s": 100.0,
            "wall_time_s": 1.0, "epochs": 1, "student": "resnet8", "teacher": None, "dataset": "digits",
            "environment": {"device": "CPU", "cpu_capability": "AVX2", "torch": "2", "threads": 1}}


@pytest.mark.filterwarnings("ignore:No artists with labels")  # no curves: the runs are made up
def test_the_suite_table_and_json_carry_the_p_value_and_holm_verdict(tmp_path):
    suite = Suite.model_validate({"name": "holm", "results_dir": str(tmp_path), "reference": "ref",
                                  "runs": {k: {"config": "unused.yaml"} for k in ("ref", "a", "b", "c")}})
    accuracies = {"ref": REFERENCE, **rows()}
    summaries = {(label, seed): _summary(label, seed, acc) for label, values in accuracies.items()
                 for seed, acc in values.items()}
    results = aggregate(suite, summaries, {}, 5)
    assert results["holm"] == {"alpha": 0.05, "comparisons": 3}
    assert {k: r["holm"] for k, r in results["runs"].items()} == {"ref": None, "a": "worse", "b": "tie", "c": "tie"}
    assert {k: r["verdict"] for k, r in results["runs"].items()} == {"ref": None, "a": "worse", "b": "better",
                                                                      "c": "better"}
    write_results(suite, results, {})
    saved = json.loads((tmp_path / "holm.json").read_text())
    assert saved["runs"]["b"]["holm"] == "tie"
    assert saved["runs"]["b"]["vs_reference"]["p_value"] == pytest.approx(hand_p(0.23), rel=1e-6)
    md = (tmp_path / "holm.md").read_text()
    assert "| - ref [95 % CI] | verdict | p | Holm |" in md
    assert "| -0.70 [-0.90, -0.50] | worse | <0.001 | worse |" in md
    assert "| +0.23 [+0.03, +0.43] | better | 0.031 | tie |" in md
    assert "| +0.21 [+0.01, +0.41] | better | 0.041 | tie |" in md
    assert "| reference | - | reference |" in md
    assert "3 comparisons" in md
