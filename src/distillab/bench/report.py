"""`distillab report`: a table and curves for any run directories, finished or not."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from rich.table import Table

from distillab.bench.plots import curves_of, plot_curves, written_by_distillab
from distillab.config_files import read_text, safe_yaml
from distillab.engine.run_files import read_metrics
from distillab.errors import DistillabError
from distillab.run import CONFIG_FILE

_SEED_SUFFIX = re.compile(r"_s\d+$")


def describe_run(run_dir: Path) -> dict[str, Any]:
    """What a run directory says about itself: its config and per-epoch records."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).is_file():
        raise DistillabError(f"{run_dir}: not a run directory (no {CONFIG_FILE})")
    cfg = safe_yaml(read_text(run_dir / CONFIG_FILE), f"{run_dir / CONFIG_FILE}: ")

    def field(section: str, key: str, default: Any = "?") -> Any:  # a hand-edited config may hold anything
        value = (cfg.get(section) if isinstance(cfg, dict) else None) or {}
        return str(value.get(key, default)) if isinstance(value, dict) and value.get(key) is not None else default

    return {
        "run": run_dir.name,
        "dir": run_dir,
        "method": field("method", "name"),
        "teacher": field("teacher", "name", None),
        "student": field("student", "name"),
        "epochs": field("train", "epochs"),
        "records": read_metrics(run_dir),
    }


def report_table(runs: list[dict[str, Any]]) -> Table:
    table = Table(title="runs at their last finished epoch", caption="best val: test % at the best-val epoch (ep)")
    for col in ("run", "method", "teacher→student", "epoch", "test %", "val %", "best val", "img/s"):
        table.add_column(col, justify="left" if col in ("run", "method", "teacher→student") else "right")
    for r in runs:
        last = r["records"][-1] if r["records"] else {}
        evaluated = next((x for x in reversed(r["records"]) if "test_acc" in x), {})  # train.eval_every > 1
        best = max((x for x in r["records"] if _number(x.get("val_acc")) and _number(x.get("test_acc"))),
                   key=lambda x: x["val_acc"], default=None)
        table.add_row(
            r["run"], r["method"], f"{r['teacher']}→{r['student']}" if r["teacher"] else r["student"],
            f"{last.get('epoch', 0)}/{r['epochs']}", _pct(evaluated.get("test_acc")), _pct(evaluated.get("val_acc")),
            f"{best['test_acc']:.2f} ({best['epoch']})" if best else "-",
            f"{last['images_per_s']:,.0f}" if _number(last.get("images_per_s")) else "-")
    return table


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _pct(value: Any) -> str:
    return f"{value:.2f}" if _number(value) else "-"


def report(run_dirs: list[Path], output: Path, group_seeds: bool = False, force: bool = False
           ) -> tuple[Table, Path | None]:
    """The table of `run_dirs` and their curves in `output` (None when no run has a finished epoch).

    With `group_seeds`, runs whose names differ only by a `_s<seed>` suffix share one line (mean, +- 1 std).
    An existing `output` is replaced only if distillab wrote it (a figure of an earlier report), or with `force`.
    """
    output = Path(output)
    if output.is_dir():
        raise DistillabError(f"--output {output} is a directory: name the PNG file to write")
    if output.exists() and not force and not written_by_distillab(output):
        raise DistillabError(f"--output {output} exists and is not a figure distillab wrote: pass --force to "
                             "replace it, or name a new file")
    runs = [describe_run(d) for d in run_dirs]
    names_unique = len({r["run"] for r in runs}) == len(runs)
    groups: dict[str, list[Path]] = {}
    for r in runs:
        key = r["run"] if names_unique else str(r["dir"])
        groups.setdefault(_SEED_SUFFIX.sub("", key) if group_seeds else key, []).append(r["dir"])
    curves = curves_of(groups)
    figure = plot_curves(curves, "runs: " + ", ".join(curves), output) if curves else None
    return report_table(runs), figure
