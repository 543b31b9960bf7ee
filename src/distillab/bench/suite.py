"""Multi-seed comparisons: run each entry of a suite for N seeds, aggregate last-epoch accuracy, and compare
every entry with a reference entry paired by seed.

A suite file names the runs to compare, each a config file plus overrides:

    name: fashion_mnist_kd              # results/<name>.json, <name>.md and <name>.png
    output_dir: runs/fashion_mnist      # run directories: <output_dir>/<label>_s<seed>
    budget: configs/fashion_mnist/_converged.yaml   # optional: laid over every entry's config
    reference: kd                       # optional: paired differences (95 % CI) against this entry
    tune:                               # optional: pick options on the validation split first
      seeds: [100, 101]
      grids: {kd: {method.options.temperature: [2, 4]}}
    runs:
      ce: {config: configs/fashion_mnist/ce.yaml}
      kd: {config: configs/fashion_mnist/kd.yaml, set: [method.options.kd_weight=0.9]}
      vit_kd: {config: configs/fashion_mnist/kd.yaml, budget: configs/fashion_mnist/_converged_vit.yaml}

A config is read as: the entry's file (with its `base:` files), then the budget's keys over it (the entry's own
`budget` where it names one), then the entry's `set`, then the tuned values, then seed, output_dir and name.
Finished runs (those with a summary.json) are skipped, so an interrupted suite resumes where it stopped; a run
another process is training (its run lock is held) is left to that process and waited for at the end, so two
`bench suite` processes on one suite share its runs. Suites sharing an output directory share the runs they have in
common (same label, same config); a label whose existing run was made from a different config is an error.

Run directories hold checkpoints and are not committed, so each finished run also leaves a small record
(config, summary, metrics, marker) under `<results_dir>/runs/<output_dir's name>/<run>/`. A run whose
directory is missing but whose record has the same config is restored from the record rather than retrained:
a suite committed half-way resumes in a fresh clone.
"""

from __future__ import annotations

import itertools
import json
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, model_validator
from rich.console import Console
from rich.table import Table

from distillab.bench.plots import curves_of, plot_accuracy, plot_curves
from distillab.bench.stats import FAMILY_ALPHA, holm_verdicts, paired_difference, summary, verdict
from distillab.config import RunConfig, StrictModel, format_validation_error
from distillab.config_files import load_config, read_text, safe_yaml
from distillab.console import make_console
from distillab.engine.checkpoint import CHECKPOINT_FILE, write_text_atomic
from distillab.engine.lock import RunLock, RunLockedError
from distillab.engine.run_files import METRICS_FILE, SUMMARY_FILE
from distillab.errors import ConfigError
from distillab.run import CONFIG_FILE, RUN_MARKER, STAGES_DIR, RunExistsError, holds_a_run, same_config, train_run

RECORD_FILES = (RUN_MARKER, CONFIG_FILE, METRICS_FILE, SUMMARY_FILE)  # SUMMARY_FILE last: written last, read first

MAX_GRID_POINTS = 4  # every tuned method gets the same small budget: at most 4 settings x the tuning seeds
WAIT_S = 10.0


class SuiteEntry(StrictModel):
    config: Path
    set: list[str] = Field(default_factory=list, description="overrides, as with --set")
    tuned_as: str | None = Field(None, description="take the values tuned for this label (an ablation of it)")
    budget: Path | None = Field(None, description="this entry's budget instead of the suite's (e.g. a teacher-free "
                                "run shared with a suite on another teacher)")
    baseline: str | None = Field(None, description="a label this row is also compared with, paired by seed: its own "
                                 "control, or the method its paper claims to beat")


class TuneSpec(StrictModel):
    """Options chosen on the validation split before the suite's runs: the best mean val accuracy wins."""

    seeds: list[int] = Field([100, 101], min_length=1, description="tuning seeds, apart from the table's")
    grids: dict[str, dict[str, list[Any]]] = Field(
        default_factory=dict, description="label -> {option key: values}; one or two keys, at most 4 settings")

    @model_validator(mode="after")
    def _small_grids(self) -> TuneSpec:
        for label, grid in self.grids.items():
            points = grid_points(grid)
            if not 1 <= len(grid) <= 2 or not all(grid.values()) or len(points) > MAX_GRID_POINTS:
                raise ValueError(f"grids.{label}: one or two option keys with values, at most {MAX_GRID_POINTS} "
                                 f"settings in all (got {len(points)})")
        return self


class Suite(StrictModel):
    name: str
    output_dir: Path = Path("runs/suites")
    results_dir: Path = Path("results")
    budget: Path | None = Field(None, description="a config file laid over every entry's config")
    reference: str | None = Field(None, description="the label every run is compared with, paired by seed")
    tune: TuneSpec | None = None
    runs: dict[str, SuiteEntry]

    @model_validator(mode="after")
    def _labels_exist(self) -> Suite:
        named = [("reference", self.reference)] + [("tune.grids", k) for k in (self.tune.grids if self.tune else {})]
        for field, label in named:
            if label is not None and label not in self.runs:
                raise ValueError(f"{field}: {label!r} is not a label of runs ({', '.join(self.runs)})")
        grids = self.tune.grids if self.tune else {}
        for label, entry in self.runs.items():
            if entry.tuned_as is not None and entry.tuned_as not in grids:
                raise ValueError(f"runs.{label}.tuned_as: {entry.tuned_as!r} has no grid in tune.grids")
            if entry.baseline is not None and (entry.baseline not in self.runs or entry.baseline == label):
                raise ValueError(f"runs.{label}.baseline: {entry.baseline!r} is not another label of runs")
        return self

    def tuned_label(self, label: str) -> str:
        """The label whose tuned values `label` takes: its own, or its `tuned_as`."""
        return self.runs[label].tuned_as or label


def load_suite(path: Path) -> Suite:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"suite file {path} does not exist")
    try:
        suite = Suite.model_validate(safe_yaml(read_text(path), f"{path}: ") or {})
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, Suite, f"{path}: ")) from None
    budgets = [("budget", suite.budget)] + [(f"runs.{k}.budget", e.budget) for k, e in suite.runs.items()]
    for field, budget in budgets:
        if budget is not None and not budget.is_file():
            raise ConfigError(f"{path}: {field}: config file {budget} does not exist")
    return suite


def grid_points(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, in order."""
    return [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]


def overrides_of(point: dict[str, Any]) -> list[str]:
    """`--set` strings of an option setting (values written as JSON, which YAML reads back unchanged)."""
    return [f"{key}={json.dumps(value)}" for key, value in point.items()]


def entry_config(suite: Suite, label: str, seed: int, extra: list[str] = (), name: str | None = None) -> RunConfig:
    entry = suite.runs[label]
    budget = entry.budget or suite.budget
    return load_config(entry.config, [*entry.set, *extra, f"seed={seed}", f"output_dir={suite.output_dir}",
                                      f"name={name or label}_s{seed}"], layers=[budget] if budget else [])


def records_dir(suite: Suite) -> Path:
    """Where the suite's finished runs are recorded: shared, like the runs, by suites with one output_dir."""
    return suite.results_dir / "runs" / suite.output_dir.name


def save_record(suite: Suite, cfg: RunConfig) -> None:
    """Copy a finished run's small files into the suite's records (unchanged files are left alone)."""
    out = records_dir(suite) / cfg.run_name
    out.mkdir(parents=True, exist_ok=True)
    for name in RECORD_FILES:
        text = (cfg.run_dir / name).read_text()
        if not (out / name).is_file() or (out / name).read_text() != text:
            write_text_atomic(out / name, text)


def restore_records(suite: Suite, configs: dict[Any, RunConfig], console: Console) -> None:
    """Recreate, from the suite's records, each finished run whose directory is gone; a record made from a
    different config than the entry's is an error, like such a run directory."""
    restored = 0
    for cfg in configs.values():
        record = records_dir(suite) / cfg.run_name
        if holds_a_run(cfg.run_dir) or not (record / SUMMARY_FILE).is_file():
            continue
        if not same_config(record / CONFIG_FILE, cfg):
            raise ConfigError(f"{record} was made from another config than the suite's entry {cfg.run_name!r}: "
                              "rename the entry or delete the record")
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        for name in RECORD_FILES:
            write_text_atomic(cfg.run_dir / name, (record / name).read_text())
        restored += 1
    if restored:
        console.print(f"restored {restored} finished run(s) from {records_dir(suite)}")


def check_existing(configs: dict[Any, RunConfig]) -> None:
    """Refuse a run directory made from another config than its entry's: it would be resumed, or counted, as
    the entry's run."""
    for cfg in configs.values():
        saved = cfg.run_dir / CONFIG_FILE
        if saved.is_file() and not same_config(saved, cfg):
            raise ConfigError(f"{cfg.run_dir} exists but was made from another config than the suite's entry "
                              f"{cfg.run_name!r}: rename the entry or move the run")


def train_all(configs: dict[Any, RunConfig], console: Console) -> None:
    """Train every config without a summary, skipping (then waiting for) runs another process holds."""
    todo = [key for key, cfg in configs.items() if not (cfg.run_dir / SUMMARY_FILE).is_file()]
    if len(todo) < len(configs):
        console.print(f"{len(configs) - len(todo)} of {len(configs)} runs already finished")
    started, durations, deferred = time.perf_counter(), [], []
    while todo:
        for i, key in enumerate(todo, 1):
            cfg = configs[key]
            if (cfg.run_dir / SUMMARY_FILE).is_file():
                continue  # finished by another process meanwhile
            if _held(cfg):
                deferred.append(key)
                continue
            eta = ""
            if durations:  # the unfinished runs from here, shared with the processes training the others
                remaining = [k for k in todo[i - 1:] if not (configs[k].run_dir / SUMMARY_FILE).is_file()]
                others = sum(1 for k in todo if _held(configs[k]))
                eta = f", about {_minutes(statistics.mean(durations) * len(remaining) / (1 + others))} left"
            console.rule(f"[{i}/{len(todo)}] {cfg.run_name} ({_minutes(time.perf_counter() - started)} "
                         f"elapsed{eta})")
            run_start = time.perf_counter()
            try:
                resume = (cfg.run_dir / CHECKPOINT_FILE).is_file() or (cfg.run_dir / STAGES_DIR).is_dir()
                train_run(cfg, resume=resume, force=holds_a_run(cfg.run_dir) and not resume, console=console,
                          skip_finished=True)  # finished by another process since the check: left as it is
            except (RunLockedError, RunExistsError):  # another process took it, or started it, since the check
                deferred.append(key)
                continue
            durations.append(time.perf_counter() - run_start)
        todo, deferred = [k for k in deferred if not (configs[k].run_dir / SUMMARY_FILE).is_file()], []
        if todo:
            console.print(f"waiting for {len(todo)} run(s) that another process is training: "
                          + ", ".join(configs[k].run_name for k in todo))
            time.sleep(WAIT_S)


def _held(cfg: RunConfig) -> bool:
    return cfg.run_dir.is_dir() and RunLock(cfg.run_dir).holder() is not None


def _finished(cfg: RunConfig) -> dict[str, Any] | None:
    path = cfg.run_dir / SUMMARY_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def tune_suite(suite: Suite, labels: list[str] | None = None, console: Console | None = None,
               train: bool = True) -> dict[str, list[str]]:
    """Run each grid of `suite.tune` (only those of `labels`, when given) on its tuning seeds and pick, per label,
    the setting with the best mean validation accuracy (the first of equals); returns label -> overrides, and
    writes <name>_tuning.{json,md}. Only finished tuning runs count: a grid with unfinished runs picks nothing."""
    console = console or make_console()
    if suite.tune is None:
        return {}
    grids = suite.tune.grids
    configs = {(label, i, seed): entry_config(suite, label, seed, overrides_of(point), f"{label}_tune{i}")
               for label, grid in grids.items() for i, point in enumerate(grid_points(grid))
               for seed in suite.tune.seeds}
    restore_records(suite, configs, console)
    check_existing(configs)
    if train:
        train_all({k: c for k, c in configs.items() if labels is None or k[0] in labels}, console)
    for cfg in configs.values():
        if _finished(cfg) is not None:
            save_record(suite, cfg)
    chosen, record = {}, {}
    for label, grid in grids.items():
        rows = []
        for i, point in enumerate(grid_points(grid)):
            runs = [_finished(configs[(label, i, seed)]) for seed in suite.tune.seeds]
            done = [r for r in runs if r is not None]
            rows.append({"setting": point, "overrides": overrides_of(point), "runs": len(done),
                         "val_acc": summary([r["val_acc"] for r in done if r.get("val_acc") is not None]),
                         "per_seed_val_acc": [r.get("val_acc") for r in done]})
        complete = all(r["runs"] == len(suite.tune.seeds) and r["val_acc"] for r in rows)
        best = max(range(len(rows)), key=lambda i: (rows[i]["val_acc"]["mean"], -i)) if complete else None
        if best is not None:
            chosen[label] = rows[best]["overrides"]
        record[label] = {"grid": grid, "seeds": suite.tune.seeds, "rows": rows, "chosen": best}
    if record:
        write_tuning(suite, record)
    return chosen


def run_suite(suite: Suite, seeds: int, console: Console | None = None, only: list[str] | None = None,
              train: bool = True) -> dict[str, Any]:
    """Tune, then train every (entry, seed) not finished yet (only the `only` labels, when given), then write
    and return the aggregate of every finished run. `train=False` only aggregates."""
    console = console or make_console()
    for label in only or []:
        if label not in suite.runs:
            raise ConfigError(f"--only: {label!r} is not a label of {suite.name} ({', '.join(suite.runs)})")
    labels = [k for k in suite.runs if only is None or k in only]
    tuned = tune_suite(suite, None if only is None else sorted({suite.tuned_label(k) for k in labels}), console,
                       train=train)
    grids = suite.tune.grids if suite.tune else {}
    pending = [k for k in suite.runs if suite.tuned_label(k) in grids and suite.tuned_label(k) not in tuned]
    tuned = {label: tuned[suite.tuned_label(label)] for label in suite.runs if suite.tuned_label(label) in tuned}
    configs = {(label, seed): entry_config(suite, label, seed, tuned.get(label, []))
               for label in suite.runs if label not in pending for seed in range(seeds)}  # all validated first
    restore_records(suite, configs, console)
    check_existing(configs)  # every entry, trained now or not: a stale run must not be counted either
    if train:
        train_all({k: c for k, c in configs.items() if k[0] in labels}, console)
    summaries = {k: s for k, c in configs.items() if (s := _finished(c)) is not None}
    for key in summaries:
        save_record(suite, configs[key])
    if not summaries:
        raise ConfigError(f"{suite.name}: no finished runs to aggregate yet")
    results = aggregate(suite, summaries, tuned, seeds)
    run_dirs = {label: [c.run_dir for k, c in configs.items() if k[0] == label and k in summaries]
                for label in results["runs"]}
    write_results(suite, results, run_dirs)
    console.print(results_table(results))
    return results


def aggregate(suite: Suite, summaries: dict[tuple[str, int], dict[str, Any]], tuned: dict[str, list[str]],
              seeds: int) -> dict[str, Any]:
    """Per label: mean, std and per-seed accuracies, and the per-seed difference to the reference with its
    p-value and Holm verdict (over every comparison of the table)."""
    test = {label: {seed: s["test_acc"] for (lab, seed), s in summaries.items() if lab == label}
            for label in suite.runs}
    reference = test.get(suite.reference, {}) if suite.reference else {}
    rows = {}
    for label in suite.runs:
        runs = [s for (lab, _), s in sorted(summaries.items()) if lab == label]
        if not runs:
            continue
        diff = paired_difference(test[label], reference) if reference and label != suite.reference else None
        rows[label] = {
            "config": str(suite.runs[label].config),
            "overrides": suite.runs[label].set,
            "tuned": tuned.get(label, []),
            "seeds": [r["seed"] for r in runs],
            "test_acc": summary([r["test_acc"] for r in runs]),
            "val_acc": summary([r["val_acc"] for r in runs if r.get("val_acc") is not None]),
            "best_epoch_test_acc": summary([r["best_epoch_test_acc"] for r in runs]),
            "per_seed_test_acc": [r["test_acc"] for r in runs],
            "per_seed_val_acc": [r.get("val_acc") for r in runs],
            "vs_reference": diff,
            "verdict": None if diff is None else verdict(diff),
            "images_per_s": statistics.mean(r["images_per_s"] for r in runs),
            "wall_time_s": statistics.mean(r["wall_time_s"] for r in runs),
            "epochs": runs[0]["epochs"],
            "teacher": runs[0].get("teacher"),
            "teacher_test_acc": runs[0].get("teacher_test_acc"),
            "teacher_sha256": runs[0].get("teacher_sha256"),
            "student": runs[0]["student"],
        }
    diffs = {label: row["vs_reference"] for label, row in rows.items() if label != suite.reference}
    for label, holm_verdict in holm_verdicts(diffs).items():
        rows[label]["holm"] = holm_verdict
    if suite.reference in rows:
        rows[suite.reference]["holm"] = None
    own = {label: paired_difference(test[label], test[b]) if (b := suite.runs[label].baseline) in rows else None
           for label in rows if suite.runs[label].baseline}  # a second family: each row against its own baseline
    for label, holm_verdict in holm_verdicts(own).items():
        diff = own[label]
        rows[label]["vs_baseline"] = {"label": suite.runs[label].baseline, "difference": diff,
                                      "verdict": None if diff is None else verdict(diff), "holm": holm_verdict}
    comparisons = sum(1 for d in diffs.values() if d is not None and d["p_value"] is not None)
    first = next(iter(summaries.values()))
    devices = Counter(_machine(s["environment"]) for s in summaries.values())
    return {"suite": suite.name, "dataset": first["dataset"],
            "environment": {**first["environment"], "devices": dict(devices.most_common())},
            "seeds_requested": seeds, "reference": suite.reference,
            "holm": {"alpha": FAMILY_ALPHA, "comparisons": comparisons} if suite.reference else None,
            "baseline_comparisons": sum(1 for d in own.values() if d is not None and d["p_value"] is not None),
            "budget": str(suite.budget) if suite.budget else None, "runs": rows,
            "not_run": [label for label in suite.runs if label not in rows]}


def _machine(env: dict[str, Any]) -> str:
    """The machine a run names: its device, and the CPU's vector instruction set where the run recorded it (a
    seed's trajectory depends on it: docs/benchmarks.md, Reproducibility)."""
    return f"{env['device']}, {env['cpu_capability']}" if env.get("cpu_capability") else env["device"]


def _fmt(stats: dict[str, float] | None) -> str:
    return "-" if stats is None else f"{stats['mean']:.2f} ± {stats['std']:.2f}"


def _fmt_diff(diff: dict[str, Any] | None) -> str:
    if diff is None:
        return "-"
    if diff["ci_low"] is None:
        return f"{diff['mean']:+.2f}"
    return f"{diff['mean']:+.2f} [{diff['ci_low']:+.2f}, {diff['ci_high']:+.2f}]"


def _verdict_cell(label: str, row: dict[str, Any], reference: str) -> str:
    if label == reference:
        return "reference"
    return row["verdict"] or f"{reference} not run yet"


def _fmt_p(diff: dict[str, Any] | None) -> str:
    p = None if diff is None else diff.get("p_value")
    return "-" if p is None else "<0.001" if p < 0.001 else f"{p:.3f}"


def _paired_cells(label: str, row: dict[str, Any], reference: str) -> list[str]:
    """The difference to the reference [95 % CI], its verdict, the paired t-test's p-value and Holm's verdict."""
    if label == reference or row["vs_reference"] is None:
        holm = _verdict_cell(label, row, reference)
    else:
        holm = row.get("holm") or "-"
    return [_fmt_diff(row["vs_reference"]), _verdict_cell(label, row, reference), _fmt_p(row["vs_reference"]), holm]


def _baseline_cell(row: dict[str, Any]) -> str:
    """`label: difference [95 % CI] verdict (Holm: verdict)` against the row's own baseline; `-` without one."""
    own = row.get("vs_baseline")
    if not own:
        return "-"
    if own["difference"] is None:
        return f"{own['label']}: not run yet"
    return (f"{own['label']}: {_fmt_diff(own['difference'])} {own['verdict']}, p {_fmt_p(own['difference'])} "
            f"(Holm: {own['holm']})")


def results_table(results: dict[str, Any]) -> Table:
    ref = results["reference"]
    table = Table(title=f"{results['suite']}: last-epoch accuracy, mean ± std over seeds"
                  + (f"; vs {ref} paired by seed, 95 % CI; Holm over the table at family-wise "
                     f"{FAMILY_ALPHA:g}" if ref else ""))
    columns = ["run", "student", "seeds", "test top-1 %", *([f"- {ref}", "verdict", "p", "Holm"] if ref else []),
               "val top-1 %"]
    for col in columns:
        table.add_column(col, justify="left" if col in ("run", "student", "verdict", "Holm") else "right")
    for label, r in results["runs"].items():
        paired = _paired_cells(label, r, ref) if ref else []
        table.add_row(label, r["student"], str(len(r["seeds"])), _fmt(r["test_acc"]), *paired, _fmt(r["val_acc"]))
    return table


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def write_results(suite: Suite, results: dict[str, Any], run_dirs: dict[str, list[Path]]) -> None:
    """results/<name>.json, <name>.md, and the figures <name>.png (accuracy, paired differences) and
    <name>_curves.png."""
    suite.results_dir.mkdir(parents=True, exist_ok=True)
    (suite.results_dir / f"{suite.name}.json").write_text(json.dumps(results, indent=2) + "\n")
    figure = plot_accuracy(results, suite.results_dir / f"{suite.name}.png")
    curves = plot_curves(curves_of(run_dirs), f"{suite.name}: mean over seeds, band +- 1 std",
                         suite.results_dir / f"{suite.name}_curves.png")
    env, ref, n = results["environment"], results["reference"], results["seeds_requested"]
    short = [label for label, r in results["runs"].items() if len(r["seeds"]) < n]
    lines = [
        f"# {suite.name}",
        "",
        f"Dataset {results['dataset']}"
        + (f", budget `{results['budget']}`" if results["budget"] else "")
        + f"; last-epoch test accuracy (validation accuracy beside it), mean ± std over seeds; best-epoch test "
        f"accuracy only for comparison with published tables. torch {env['torch']}, {env['threads']} threads, "
        + ", ".join(f"{device} ({count} runs)" for device, count in env["devices"].items()) + ".",
    ]
    if ref:
        holm = results.get("holm") or {"alpha": FAMILY_ALPHA, "comparisons": 0}
        lines += ["", f"`- {ref}`: the per-seed difference to `{ref}` (same seeds), its mean and 95 % confidence "
                      "interval (t distribution, n-1 degrees of freedom); `better`/`worse` only when the interval "
                      "excludes 0, else `tie`. Each interval holds for its own comparison; `p` is the paired "
                      f"t-test's two-sided p-value and `Holm` the verdict once the {holm['comparisons']} comparisons "
                      f"of the table are corrected together (Holm-Bonferroni, family-wise error {holm['alpha']:g}): "
                      "`better`/`worse` only where Holm rejects a zero difference."
                  + (" The runs come from more than one machine, and a seed follows a different trajectory on "
                     "each (docs/benchmarks.md, Reproducibility): a pair then shares its settings, not its random "
                     "path." if len(env["devices"]) > 1 else "")]
    if short or results["not_run"]:
        lines += ["", f"**Incomplete**: {n} seeds requested; "
                  + "; ".join(filter(None, [
                      ", ".join(f"{k} has {len(results['runs'][k]['seeds'])}" for k in short),
                      ("not run yet: " + ", ".join(results["not_run"])) if results["not_run"] else ""]))
                  + "."]
    baselines = any(r.get("vs_baseline") for r in results["runs"].values())
    if baselines:
        lines += ["", "`- own baseline`: the same paired comparison against the row's own baseline (its logit "
                      "recipe's control, or the method its paper claims to beat), with its p-value and a Holm "
                      f"verdict over the {results.get('baseline_comparisons', 0)} such comparisons of the table (a "
                      "second family)."]
    head = ["run", "teacher -> student", "seeds", "test top-1 %",
            *([f"- {ref} [95 % CI]", "verdict", "p", "Holm"] if ref else []),
            *(["- own baseline [95 % CI]"] if baselines else []),
            "val top-1 %", "best-epoch test %", "test % per seed", "img/s"]
    lines += ["", "| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|"]
    for label, r in results["runs"].items():
        pair = f"{r['teacher']} -> {r['student']}" if r["teacher"] else r["student"]
        paired = _paired_cells(label, r, ref) if ref else []
        cells = [label, pair, str(len(r["seeds"])), _fmt(r["test_acc"]), *paired,
                 *([_baseline_cell(r)] if baselines else []), _fmt(r["val_acc"]),
                 _fmt(r["best_epoch_test_acc"]), " ".join(f"{a:.2f}" for a in r["per_seed_test_acc"]),
                 f"{r['images_per_s']:,.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    tuned = {label: r["tuned"] for label, r in results["runs"].items() if r["tuned"]}
    if tuned:
        lines += ["", f"Tuned on the validation split (`{suite.name}_tuning.md`): "
                  + "; ".join(f"{k}: {', '.join(v)}" for k, v in tuned.items()) + "."]
    lines += ["", f"![accuracy]({figure.name})", "", f"![curves]({curves.name})"]
    (suite.results_dir / f"{suite.name}.md").write_text("\n".join(lines) + "\n")


def write_tuning(suite: Suite, record: dict[str, Any]) -> None:
    """results/<name>_tuning.json and .md: each grid's settings with their validation accuracy."""
    suite.results_dir.mkdir(parents=True, exist_ok=True)
    (suite.results_dir / f"{suite.name}_tuning.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [f"# {suite.name}: tuning on the validation split", "",
             "Each setting is trained on the tuning seeds; the best mean validation accuracy is chosen "
             "(test accuracy is never read).", ""]
    for label, grid in record.items():
        lines += [f"## {label}", "", "| setting | runs | val top-1 % | per seed | chosen |", "|---|---:|---:|---:|---|"]
        for i, row in enumerate(grid["rows"]):
            per_seed = " ".join(f"{v:.2f}" for v in row["per_seed_val_acc"] if v is not None)
            lines.append(f"| {', '.join(row['overrides'])} | {row['runs']} | {_fmt(row['val_acc'])} | {per_seed} | "
                         f"{'**yes**' if grid['chosen'] == i else ''} |")
        lines.append("")
    (suite.results_dir / f"{suite.name}_tuning.md").write_text("\n".join(lines))
