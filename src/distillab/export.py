"""`distillab export`: a run's deployed student, rebuilt from its last checkpoint, as a safetensors file.

The method is rebuilt from the run's config (teacher weights and data included, for the shapes), its trained
state is loaded from `checkpoints/last.pt`, and `deploy_student()` gives the network to ship: for RDR the
branches merged into the plain student, for every other method the student itself. The file loads strictly
into a freshly built zoo model of the run's student name (unless RDR's `fuse_bn` is set).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from distillab.data import load_splits
from distillab.engine.checkpoint import CHECKPOINT_FILE, load_checkpoint, save_safetensors
from distillab.errors import CheckpointError, DistillabError
from distillab.run import build_method, load_run_config

EXPORT_FILE = "exported_student.safetensors"


@dataclass
class Exported:
    """What `export_run` wrote."""

    path: Path
    model: str
    method: str
    parameters: int
    epoch: int
    step: int


def export_run(run_dir: str | Path, output: str | Path | None = None, overrides: list[str] = ()) -> Exported:
    """Write the deployed student of `run_dir` to `output` (default `RUN_DIR/exported_student.safetensors`).

    `overrides` change fields of the run's config first (e.g. `method.options.fuse_bn=true`, `data.root=...`).
    """
    run_dir = Path(run_dir)
    if output is not None and Path(output).is_dir():
        raise DistillabError(f"--output {output} is a directory: name the .safetensors file to write")
    cfg = load_run_config(run_dir, overrides)
    state = load_checkpoint(run_dir / CHECKPOINT_FILE)
    method, _ = build_method(cfg, load_splits(cfg.data))
    try:
        method.load_trainable_state_dict(state["method"])
    except RuntimeError as exc:
        raise CheckpointError(f"{run_dir / CHECKPOINT_FILE}: does not match the run's method: {exc}") from None
    student = method.deploy_student()
    path = Path(output) if output is not None else run_dir / EXPORT_FILE
    save_safetensors(student, path, metadata={"model": cfg.student.name, "method": cfg.method.name})
    return Exported(path, cfg.student.name, cfg.method.name, sum(p.numel() for p in student.parameters()),
                    int(state["epoch"]), int(state.get("step", 0)))
