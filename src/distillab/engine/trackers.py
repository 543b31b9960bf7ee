"""Where a run's numbers go besides `metrics.jsonl`: `metrics.csv` always, and the trackers of `train.trackers`.

    tensorboard  <run>/tb: every epoch's numbers, each step's loss terms with `train.log_steps`, and the run's
                 hyper-parameters with its final accuracies (the HPARAMS tab)
    wandb        a Weights & Biases run (`WANDB_MODE=offline` works without an account; files under <run>/wandb)
    mlflow       an MLflow run (tracking URI from MLFLOW_TRACKING_URI, default a file store in <run>/mlruns, which
                 MLflow 3 allows with MLFLOW_ALLOW_FILE_STORE=true: set for it when unset)

Each package is optional: `check_trackers` imports them before the run directory is created, so a missing one
is named at once and costs no `--force`. Only the main process of a data-parallel run writes.
"""

from __future__ import annotations

import csv
import importlib
import io
import os
from pathlib import Path
from typing import Any

from distillab.engine.checkpoint import write_text_atomic
from distillab.errors import DistillabError

CSV_FILE = "metrics.csv"
PACKAGES = {"tensorboard": ("torch.utils.tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
            "mlflow": ("mlflow", "mlflow")}


def check_trackers(names: list[str]) -> None:
    """Import every tracker's package now; a missing one is an error naming the extra that installs it."""
    for name in names:
        module, extra = PACKAGES[name]
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise DistillabError(f"train.trackers: {name} needs the {extra} package ({exc}): "
                                 f"pip install 'distillab[{extra}]'") from None


def write_csv(run_dir: Path, history: list[dict[str, Any]]) -> None:
    """metrics.csv: one row per epoch, a column per number any epoch has (empty where an epoch has none)."""
    columns = list(dict.fromkeys(k for record in history for k in record))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    write_text_atomic(run_dir / CSV_FILE, out.getvalue())


def flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as dotted keys with scalar values (lists and None as text)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat(value, name + "."))
        else:
            out[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out


def _numbers(record: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            and k != "epoch"}


class Trackers:
    """The run's trackers, opened together: `epoch(record)`, `step(record, global_step)`, `finish(summary)`."""

    def __init__(self, names: list[str], run_dir: Path, run_name: str, run_id: str, config: dict[str, Any]) -> None:
        check_trackers(names)
        self.params = flat(config)
        self._tb = self._wandb = self._mlflow = None
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tb"))
        if "wandb" in names:
            import wandb

            self._wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "distillab"), name=run_name, id=run_id,
                                     resume="allow", dir=str(run_dir), config=config, reinit="finish_previous")
        if "mlflow" in names:
            import mlflow

            if "MLFLOW_TRACKING_URI" not in os.environ:  # a file store inside the run, which MLflow 3 only allows
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # on request
                mlflow.set_tracking_uri((run_dir / "mlruns").resolve().as_uri())
            self._mlflow = mlflow
            mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "distillab"))
            found = mlflow.search_runs(filter_string=f"tags.distillab_run_id = '{run_id}'", output_format="list")
            mlflow.start_run(run_id=found[0].info.run_id if found else None, run_name=None if found else run_name,
                             tags={"distillab_run_id": run_id})
            if not found:
                mlflow.log_params(self.params)

    def epoch(self, record: dict[str, Any]) -> None:
        numbers, epoch = _numbers(record), int(record["epoch"])
        if self._tb is not None:
            for key, value in numbers.items():
                self._tb.add_scalar(key, value, epoch)
        if self._wandb is not None:
            self._wandb.log({**numbers, "epoch": epoch})
        if self._mlflow is not None:
            self._mlflow.log_metrics(numbers, step=epoch)

    def step(self, record: dict[str, Any], global_step: int) -> None:
        """One training step's numbers (with `train.log_steps`), under `step/`."""
        numbers = {f"step/{k}": v for k, v in _numbers(record).items() if k != "step"}
        if self._tb is not None:
            for key, value in numbers.items():
                self._tb.add_scalar(key, value, global_step)
        if self._mlflow is not None:
            self._mlflow.log_metrics(numbers, step=global_step)

    def finish(self, summary: dict[str, Any] | None) -> None:
        """Close every tracker; with the run's summary (a finished run) log its final accuracies as well."""
        final = {k: float(v) for k, v in (summary or {}).items() if k in ("test_acc", "val_acc", "train_acc")
                 and isinstance(v, (int, float))}
        if self._tb is not None:
            if final:
                self._tb.add_hparams(self.params, {f"final/{k}": v for k, v in final.items()}, run_name="hparams")
            self._tb.close()
        if self._wandb is not None:
            self._wandb.summary.update(final)
            self._wandb.finish()
        if self._mlflow is not None:
            if final:
                self._mlflow.log_metrics({f"final_{k}": v for k, v in final.items()})
            self._mlflow.end_run()
