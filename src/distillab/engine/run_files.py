"""The files of a run directory that the engine writes and the reports read, and reading its per-epoch records."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console

from distillab.console import make_console
from distillab.errors import DistillabError

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
STEPS_FILE = "steps.jsonl"


def read_metrics(run_dir: Path, console: Console | None = None) -> list[dict[str, Any]]:
    """The per-epoch records of a run (its metrics.jsonl). A torn last line (a run killed mid-write) is
    skipped with a warning; a bad line before it is an error naming the file and line."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if i < len(lines):
                raise DistillabError(f"{path}: line {i} is not a JSON record (the file is damaged)") from None
            (console or make_console(stderr=True)).print(f"warning: {path}: skipped a torn last line (a run stopped "
                                                    "mid-write)")
            continue
        epoch = record.get("epoch") if isinstance(record, dict) else None
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 1:
            raise DistillabError(f"{path}: line {i} is not an epoch's record (its epoch is {epoch!r}, not a count "
                                 "from 1): the file was edited or damaged")
        bad = next((k for k, v in record.items() if not isinstance(v, (int, float)) or isinstance(v, bool)), None)
        if bad is not None:
            raise DistillabError(f"{path}: line {i}: {bad} is {record[bad]!r}, not a number: the file was edited or "
                                 "damaged")
        records.append(record)
    return records
