"""From a validated RunConfig to a finished run directory: data, models, method, trainer."""

from __future__ import annotations

import json
import os
import shutil
import uuid
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from rich.console import Console

from distillab import methods, models, published
from distillab.config import ModelConfig, RunConfig, format_validation_error
from distillab.config_files import config_that_trains, dump_config, load_config, merge
from distillab.console import make_console
from distillab.data import DataSplits, load_splits
from distillab.engine.checkpoint import (
    CHECKPOINT_FILE,
    check_training_state,
    load_checkpoint,
    load_weights,
    write_text_atomic,
)
from distillab.engine.cpu_memory import keep_freed_memory
from distillab.engine.device import resolve_device
from distillab.engine.distributed import World, barrier, broadcast_flag, init_world, local_device
from distillab.engine.lock import LOCK_FILE, RunLock
from distillab.engine.run_files import SUMMARY_FILE
from distillab.engine.trackers import check_trackers
from distillab.engine.trainer import Trainer, TrainingStopped, check_batch, check_setup
from distillab.errors import CheckpointError, ConfigError, DistillabError
from distillab.methods import capabilities
from distillab.models.outside import ReinitialisedWeights

CONFIG_FILE = "config.yaml"
RUN_MARKER = ".distillab-run"  # written into every run directory distillab creates; --force deletes only these
STAGES_DIR = "stages"  # a multi-stage run's earlier stages: <run>/stages/<stage>/, each a run directory


def set_determinism(deterministic: bool) -> None:
    """train.deterministic: torch's deterministic algorithms and cuDNN's deterministic kernels; otherwise cuDNN's
    autotuner (`cudnn.benchmark`), which picks the fastest kernel per shape (our loaders keep shapes fixed)."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for deterministic GEMMs
    if torch.are_deterministic_algorithms_enabled() != deterministic:  # setting it imports torch._inductor (2 s)
        torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic


def build_models(cfg: RunConfig, data: DataSplits, with_teacher: bool = True
                 ) -> tuple[torch.nn.Module | None, torch.nn.Module, dict[str, Any]]:
    """The teacher (weights loaded; None unless `with_teacher`), the student (seeded init) and the run's info."""
    info: dict[str, Any] = {"run": cfg.run_name, "student": cfg.student.name, "dataset": cfg.data.name}
    teacher = None
    if with_teacher:
        if cfg.teacher is None:
            raise ConfigError(f"method {cfg.method.name!r} needs a teacher: set teacher.name and teacher.checkpoint")
        teacher = _build_model(cfg.teacher, data, exact_weights=cfg.teacher.checkpoint is None)
        info["teacher"] = cfg.teacher.name
        preloaded = getattr(teacher, "weights_source", None)  # an hf: directory with its weights
        if cfg.teacher.checkpoint is None and preloaded is None:
            raise ConfigError("teacher.checkpoint is not set: an untrained teacher teaches nothing "
                              "(train one with method ce and point teacher.checkpoint at its run directory)")
        if cfg.teacher.checkpoint is None:
            info["teacher_weights"] = str(preloaded)
        else:
            info["teacher_sha256"] = load_weights(teacher, teacher_weights_path(cfg), "teacher")
        if cfg.teacher.sha256 is not None and info.get("teacher_sha256") != cfg.teacher.sha256:
            raise CheckpointError(f"teacher weights {cfg.teacher.checkpoint}: SHA-256 {info.get('teacher_sha256')} "
                                  f"is not the expected teacher.sha256 {cfg.teacher.sha256} (a changed or "
                                  "different file)")
        check_teacher_weights(teacher, cfg.teacher.checkpoint or preloaded)
    torch.manual_seed(cfg.seed)
    student = _build_model(cfg.student, data)
    if cfg.student.checkpoint is not None:  # start from given weights instead of the seeded init
        info["student_init_sha256"] = load_weights(student, published.resolve(cfg.student.checkpoint, "student"),
                                                   "student")
        if cfg.student.sha256 is not None and info["student_init_sha256"] != cfg.student.sha256:
            raise CheckpointError(f"student weights {cfg.student.checkpoint}: SHA-256 {info['student_init_sha256']} "
                                  f"is not the expected student.sha256 {cfg.student.sha256}")
    return teacher, student, info


def _build_model(spec: ModelConfig, data: DataSplits, exact_weights: bool = False) -> torch.nn.Module:
    """The teacher or student `spec` for `data`. `exact_weights`: see `models.build`; with a checkpoint to load,
    the weights an `hf:` directory gives as it is built are replaced, so no re-initialised tensor is reported."""
    with warnings.catch_warnings():
        if spec.checkpoint is not None:
            warnings.simplefilter("ignore", ReinitialisedWeights)
        return models.build(spec.name, num_classes=data.num_classes, in_channels=data.image_shape[0],
                            input_size=data.image_shape, exact_weights=exact_weights, **spec.kwargs)


def teacher_weights_path(cfg: RunConfig) -> Path:
    """The file or run directory of the teacher's weights (`published:NAME` resolved); where nothing is there, a
    CheckpointError that says how to get the teacher."""
    assert cfg.teacher is not None and cfg.teacher.checkpoint is not None
    path = published.resolve(cfg.teacher.checkpoint)
    if not path.expanduser().exists():
        hint = published.missing_teacher_hint(cfg, config_that_trains(path, cfg.teacher.name))
        raise CheckpointError(f"{path}: weights file not found (teacher.checkpoint); {hint}")
    return path


def check_teacher_weights(teacher: torch.nn.Module, where: Path) -> None:
    """A teacher's floating-point tensors must be finite (dtypes are checked as the weights load)."""
    for name, tensor in teacher.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(f"teacher weights {where}: {name!r} holds NaN or infinite values")


def build_method(cfg: RunConfig, data: DataSplits) -> tuple[methods.Method, dict[str, Any]]:
    """The teacher (weights loaded), the student (seeded init) and the method around them."""
    method_cls = methods.get(cfg.method.name)
    teacher, student, info = build_models(cfg, data, method_cls.requires_teacher)
    method = methods.build(cfg.method.name, student, teacher, input_shape=data.image_shape, **cfg.method.options)
    if capabilities.needs_indices(method):  # complete before any Trainer: export and eval load into it too
        method.bind_train_set(data.train.labels)
    return method, info


def restore_method(run_dir: str | Path, overrides: list[str] = (), allow_code: bool = False
                   ) -> tuple[RunConfig, DataSplits, methods.Method, dict[str, Any]]:
    """A run's method, rebuilt from its config (data and teacher weights included) with the trained state of its
    last checkpoint: what `distillab export` and `distillab eval` deploy. Returns the config, the data, the method
    and the checkpoint. `overrides` and `allow_code`: see `load_run_config`."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir, overrides, allow_code=allow_code)
    state = load_checkpoint(run_dir / CHECKPOINT_FILE)
    check_training_state(state, run_dir / CHECKPOINT_FILE)
    data = load_splits(cfg.data)
    with warnings.catch_warnings():  # the student's first weights, whatever was re-initialised, give way to these
        warnings.simplefilter("ignore", ReinitialisedWeights)
        method, _ = build_method(cfg, data)
    try:
        method.load_trainable_state_dict(state["method"])
    except RuntimeError as exc:
        raise CheckpointError(f"{run_dir / CHECKPOINT_FILE}: does not match the run's method: {exc}") from None
    return cfg, data, method, state


class RunExistsError(DistillabError):
    """The run directory already holds a run, and neither --resume nor --force was given."""


def check_run_dir(run_dir: Path, resume: bool, force: bool, staged: bool = False) -> None:
    """A run directory is never overwritten unless `force`; `resume` continues one in place (a `staged` run
    also when only its earlier stages have begun). Judged under the run's lock (`claim_run_dir`).

    `force` deletes only a directory that is provably a distillab run: it carries the run marker, it is not a
    symbolic link, and it resolves to a child of the output directory.
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise DistillabError(f"{run_dir} is a file, not a run directory: choose another name or output_dir")
    exists = holds_a_run(run_dir)
    if exists and not (resume or force):
        raise RunExistsError(f"{run_dir} already exists: pass --resume to continue it or --force to "
                             "start it again from scratch")
    if resume and not exists:
        raise DistillabError(f"{run_dir}: nothing to resume (no such run)")
    if resume and not (run_dir / CHECKPOINT_FILE).is_file() and not (staged and (run_dir / STAGES_DIR).is_dir()):
        why = ("has finished and has no checkpoint" if (run_dir / SUMMARY_FILE).is_file() else
               "has no checkpoint (it stopped before its first epoch ended)")
        raise DistillabError(f"{run_dir} {why} to resume from: start it again with --force")
    if exists and force and not resume:
        if run_dir.is_symlink():
            raise DistillabError(f"--force: {run_dir} is a symbolic link; distillab deletes no link targets "
                                 "(remove it yourself if you mean to)")
        if run_dir.resolve().parent != run_dir.parent.resolve():
            raise DistillabError(f"--force: {run_dir} does not resolve to a directory inside {run_dir.parent}")
        if not (run_dir / RUN_MARKER).is_file():
            raise DistillabError(f"--force: {run_dir} is not a distillab run directory (no {RUN_MARKER} "
                                 "marker); delete it yourself if you mean to")


def holds_a_run(run_dir: Path) -> bool:
    """Whether `run_dir` holds anything of a run (beyond its marker and lock file)."""
    return run_dir.is_dir() and any(p.name not in (RUN_MARKER, LOCK_FILE) for p in run_dir.iterdir())


def claim_run_dir(run_dir: Path) -> tuple[RunLock, list[Path]]:
    """Take the run directory's lock (creating the directory, and its parents, as needed) before anything judges
    its state, so that two processes never both decide to train it. Returns the lock and the directories made
    for it, deepest first (`unclaim` removes them if the run never starts)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise DistillabError(f"{run_dir} is a file, not a run directory: choose another name or output_dir")
    made, path = [], run_dir
    while not path.exists() and path != path.parent:
        made.append(path)
        path = path.parent
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        return RunLock(run_dir).acquire(), made
    except OSError as exc:
        _remove_empty(made)
        raise DistillabError(f"cannot create the run directory {run_dir}: {exc.strerror or exc}") from None


def unclaim(lock: RunLock, made: list[Path]) -> None:
    """Undo `claim_run_dir` for a run that never started: the lock file and the directories made, if empty."""
    if made:
        lock.path.unlink(missing_ok=True)
    lock.release()
    _remove_empty(made)


def _remove_empty(dirs: list[Path]) -> None:
    for path in dirs:
        try:
            path.rmdir()
        except OSError:
            return  # not empty (another process is using it) or not removable: leave it and its parents


def prepare_run_dir(run_dir: Path, clear: bool, run_id: str) -> None:
    """Under the run's lock: with `clear` (--force, proved a distillab run by `check_run_dir`) delete the old run
    but the lock file; then write the marker naming `run_id`, unless one names a run already."""
    try:
        if clear:
            for child in run_dir.iterdir():
                if child.name != LOCK_FILE:
                    shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        if read_run_id(run_dir) is None:  # new, cleared, or made before markers named their run
            write_text_atomic(run_dir / RUN_MARKER, "a distillab run directory: `--force` may delete it and all it "
                              f"holds\nrun_id: {run_id}\n")
    except OSError as exc:
        raise DistillabError(f"cannot prepare the run directory {run_dir}: {exc.strerror or exc}") from None


def refuse_inside_runs(path: Path, option: str = "--output") -> None:
    """A command other than training never writes into a run directory (one with a run marker above `path`)."""
    run = next((d for d in Path(path).expanduser().resolve().parents if (d / RUN_MARKER).is_file()), None)
    if run is not None:
        raise DistillabError(f"{option} {path}: inside the run directory {run}, which this command does not write "
                             "into: name a file outside it")


def check_new_file(path: Path, force: bool, option: str = "--output") -> None:
    """A file a command is about to write: not a directory, not inside a run, and not an existing file unless
    `force` (then written with `replace=False`, so that a file created meanwhile is not replaced either)."""
    if path.is_dir():
        raise DistillabError(f"{option} {path} is a directory: name the file to write")
    refuse_inside_runs(path, option)
    if path.exists() and not force:
        raise DistillabError(f"{option} {path} exists: pass --force to overwrite it, or name a new file")


def read_run_id(run_dir: Path) -> str | None:
    """The run id in a run directory's marker (None for runs made before markers had one)."""
    marker = run_dir / RUN_MARKER
    if marker.is_file():
        for line in marker.read_text(errors="replace").splitlines():
            if line.startswith("run_id:"):
                return line.split(":", 1)[1].strip() or None
    return None


# Fields a resume may change: they alter neither the data order, the shapes nor what was trained so far.
RESUME_MAY_CHANGE = ("name", "output_dir", "data.root", "data.download", "train.epochs", "train.device",
                     "train.progress", "train.tensorboard", "train.checkpoint_every", "train.eval_every",
                     "train.log_steps", "train.eval_batch_size")


def resume_changes(saved: dict[str, Any], cfg: RunConfig, source: str, linked: Iterable[str] = ()) -> list[str]:
    """The fields in which `cfg` differs from the `saved` resolved config (read from `source`); an unsafe change
    is refused, naming the fields. `linked` fields were set from the earlier stages' outputs (paths inside the
    run, which move with it)."""
    changed = _differences(_in_current_schema(saved), resolved_config(cfg))
    unsafe = [k for k in changed if k not in linked
              and not any(k == ok or k.startswith(ok + ".") for ok in RESUME_MAY_CHANGE)]
    if unsafe:
        raise DistillabError(f"--resume: {', '.join(unsafe)} differ{'s' if len(unsafe) == 1 else ''} from {source}; "
                             "a resumed run must keep its data, models, method and optimisation (only epochs, "
                             "device, logging and data.root may change; an edited config.yaml does not count): "
                             "start a new run instead")
    return [k for k in changed if k not in ("name", "output_dir")]


def _in_current_schema(saved: dict[str, Any]) -> dict[str, Any]:
    """`saved` with the defaults of fields (and method options) added since it was written, so that a field the
    older release did not have is not a change. A field it has that no longer exists is kept as it was (and so
    shows as a difference); where it does not validate for another reason, it is returned as it is."""
    trimmed, retired = json.loads(json.dumps(saved)), []
    try:
        RunConfig.model_validate(trimmed)
    except ValidationError as err:
        retired = [e["loc"] for e in err.errors() if e["type"] == "extra_forbidden"]
        for loc in retired:
            _get(trimmed, loc[:-1]).pop(loc[-1], None)
    try:
        current = resolved_config(RunConfig.model_validate(trimmed))
    except (ValidationError, DistillabError):
        return saved
    for loc in retired:
        _put(current, loc, _get(saved, loc))
    return current


def _get(tree: Any, loc: tuple[Any, ...]) -> Any:
    for key in loc:
        tree = tree[key]
    return tree


def _put(tree: Any, loc: tuple[Any, ...], value: Any) -> None:
    for key in loc[:-1]:
        tree = tree.setdefault(key, {})
    tree[loc[-1]] = value


def saved_run_config(run_dir: Path) -> dict[str, Any]:
    """A run's config.yaml, resolved: what a resume is compared with when no checkpoint records its config."""
    try:
        return resolved_config(load_config(run_dir / CONFIG_FILE))
    except ConfigError as exc:
        raise DistillabError(f"{run_dir / CONFIG_FILE}: the run's saved config no longer loads: {exc}") from None


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for key in sorted(set(a) | set(b), key=str)
                for d in _differences(a.get(key), b.get(key), f"{prefix}{key}.")]
    return [] if a == b else [prefix.rstrip(".")]


def stage_configs(cfg: RunConfig) -> list[tuple[methods.Stage, RunConfig]]:
    """The earlier stages of `cfg`'s method, each with its validated config: the run's, with the stage's method
    and train keys, under <run>/stages/<name>. Empty for a single-stage method."""
    method_cls = methods.get(cfg.method.name)
    out = []
    for stage in capabilities.stages(method_cls, methods.validate_options(method_cls, cfg.method.options)):
        raw = cfg.model_dump(mode="json")
        raw.update(name=stage.name, output_dir=str(cfg.run_dir / STAGES_DIR),
                   method={"name": stage.method, "options": stage.options}, train=merge(raw["train"], stage.train))
        try:
            out.append((stage, RunConfig.model_validate(raw)))
        except ValidationError as err:
            raise ConfigError(format_validation_error(err, RunConfig, f"stage {stage.name}: ")) from None
    return out


def train_run(cfg: RunConfig, *, resume: bool = False, force: bool = False, console: Console | None = None,
              on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None,
              skip_finished: bool = False) -> dict[str, Any]:
    """Train the run described by `cfg` into `cfg.run_dir` (a multi-stage method's earlier stages first, each
    into <run>/stages/<name>, skipped once finished); returns its summary.

    The run directory's lock is taken first and its state judged under it; everything (configs of every stage,
    data, teacher weights, checkpoint) is validated before anything on disk changes, so a refused `force`
    deletes nothing. With `skip_finished`, a run found finished under the lock is returned as it is (another
    process finished it meanwhile).
    """
    device = resolve_device(cfg.train.device)
    world = init_world(device)  # process-wide set-up lives here, not in the Trainer
    if device.type == "cpu":
        keep_freed_memory()
    console = console or make_console(quiet=not world.is_main)
    set_determinism(cfg.train.deterministic)  # process-wide, so set here rather than by the Trainer
    run_dir = cfg.run_dir
    check_trackers(cfg.train.tracker_names)  # a missing tracker package is named before the run directory exists
    stages = stage_configs(cfg)  # every stage's config is valid before anything is done
    lock, made, refused = None, [], None
    if world.is_main:
        try:
            lock, made = claim_run_dir(run_dir)
        except DistillabError as exc:
            refused = exc
    if broadcast_flag(refused is not None, world, local_device(device, world)):  # every rank stops alike
        raise refused or DistillabError(f"{run_dir}: rank 0 could not claim the run directory")
    started = False
    try:
        if skip_finished and (run_dir / SUMMARY_FILE).is_file():
            return json.loads((run_dir / SUMMARY_FILE).read_text())
        check_run_dir(run_dir, resume, force, staged=bool(stages))
        run_id = (read_run_id(run_dir) if resume else None) or uuid.uuid4().hex
        if cfg.teacher is not None and cfg.teacher.checkpoint is not None and methods.get(
                cfg.method.name).requires_teacher:
            teacher_weights_path(cfg)  # a missing teacher is named before any data is read or downloaded
        data = load_splits(cfg.data)
        trainer = None
        if stages:
            preflight(stages, cfg, data, world, device, rerun=force and not resume)
        else:  # built (and a bad checkpoint refused) before anything is written
            cfg, trainer = _trainer(cfg, data, run_id, console, on_epoch_end, resume)
        saved = (trainer.checkpoint_config if trainer is not None else None)
        changed = resume_changes(saved or saved_run_config(run_dir), cfg,
                                 "the config the checkpoint was trained with" if saved else
                                 f"the run's {CONFIG_FILE}") if resume else []
        barrier(world)  # every rank has checked the run directory, and all is valid, before rank 0 changes it
        if world.is_main:
            prepare_run_dir(run_dir, clear=force and not resume, run_id=run_id)
            started = True
            if changed or not resume:
                try:
                    write_text_atomic(run_dir / CONFIG_FILE, dump_config(cfg))
                except OSError as exc:
                    raise DistillabError(f"{exc.strerror or exc} while writing {run_dir / CONFIG_FILE}") from None
        final = cfg
        for stage, stage_cfg in stages:
            stage_dir = stage_cfg.run_dir
            if not (stage_dir / SUMMARY_FILE).is_file():
                console.rule(f"{cfg.run_name}: stage {stage.name} ({stage.method})")
                again = (stage_dir / CHECKPOINT_FILE).is_file()
                try:
                    train_run(stage_cfg, resume=again, force=holds_a_run(stage_dir) and not again, console=console)
                except TrainingStopped as exc:  # resume the whole run, not just the stage
                    raise TrainingStopped(str(exc).replace(f"--resume {stage_dir}", f"--resume {run_dir}"),
                                          exc.signum) from None
            options = stage.link(final.method.options, stage_dir) if stage.link else final.method.options
            final = final.model_copy(update={"method": final.method.model_copy(update={"options": options})})
        if trainer is None:
            if stages:
                console.rule(f"{cfg.run_name}: {cfg.method.name}")
            final, trainer = _trainer(final, data, run_id, console, on_epoch_end,
                                      resume and (run_dir / CHECKPOINT_FILE).is_file())
            if trainer.checkpoint_config is not None:
                linked = _differences(resolved_config(cfg), resolved_config(final))
                resume_changes(trainer.checkpoint_config, final, "the config the checkpoint was trained with", linked)
        side = trainer.method.side_parameter_count()
        console.print(f"[bold]{cfg.run_name}[/]: {cfg.method.name} "
                      f"{cfg.teacher.name + ' -> ' if cfg.teacher else ''}{cfg.student.name} on {cfg.data.name} "
                      f"({len(data.train)} train{f', {len(data.val)} val' if data.val is not None else ''}, "
                      f"{len(data.test)} test); side modules {side:,} params")
        return trainer.fit()
    except BaseException:
        if lock is not None and not started:
            unclaim(lock, made)
            lock = None
        raise
    finally:
        if lock is not None:
            lock.release()


def preflight(stages: list[tuple[methods.Stage, RunConfig]], cfg: RunConfig, data: DataSplits, world: World,
              device: torch.device, rerun: bool) -> None:
    """A staged run's checks before anything on disk changes: every stage to train (all of them when `rerun`)
    builds its method and passes the trainer's checks; the final method, whose options need the stages' outputs,
    gets the checks that need no method (its batch against the data)."""
    for _stage, stage_cfg in stages:
        if rerun or not (stage_cfg.run_dir / SUMMARY_FILE).is_file():
            method, _ = build_method(stage_cfg, data)
            try:
                check_setup(method, data, stage_cfg.train, world, device)
            finally:
                method.close()
    check_batch(cfg.train, len(data.train), world)


def _trainer(cfg: RunConfig, data: DataSplits, run_id: str, console: Console,
             on_epoch_end: Callable[[int, dict[str, Any]], None] | None, resume: bool) -> tuple[RunConfig, Trainer]:
    """The method and its Trainer (restored from the run's checkpoint when `resume`); the config comes back with
    the epochs a method's own schedule fixes (a search)."""
    method, info = build_method(cfg, data)
    epochs = capabilities.fixed_epochs(method)
    if epochs is not None and epochs != cfg.train.epochs:
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": epochs})})
    info["run_id"] = run_id
    trainer = Trainer(method, data, cfg.train, seed=cfg.seed, run_dir=cfg.run_dir, info=info,
                      augment=cfg.data.augment, console=console, on_epoch_end=on_epoch_end,
                      run_config=resolved_config(cfg))
    if resume:
        trainer.restore(cfg.run_dir / CHECKPOINT_FILE)  # a bad checkpoint is refused before anything is written
    trainer.evaluate_teacher()  # and a teacher at chance (a new run's only)
    return cfg, trainer


def same_config(saved: Path, cfg: RunConfig) -> bool:
    """Whether a run's saved config describes `cfg`, read with today's defaults (so that a field added to
    the schema after the run was made, an option renamed since, or a method option set to its default value
    does not count as a difference)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # old option names in old runs: not the user's to fix
            return resolved_config(load_config(saved)) == resolved_config(cfg)
    except DistillabError:
        return False


def resolved_config(cfg: RunConfig) -> dict[str, Any]:
    """`cfg` as JSON data with every method option given its value (its default where unset): the form runs are
    compared in, and the one a checkpoint records."""
    options = methods.validate_options(methods.get(cfg.method.name), cfg.method.options).model_dump(mode="json")
    return cfg.model_copy(update={"method": cfg.method.model_copy(update={"options": options})}).model_dump(
        mode="json")


CODE_PREFIX = "module:"


def load_run_config(run_dir: Path, overrides: list[str] = (), allow_code: bool = False) -> RunConfig:
    """The config a run was started with, placed in `run_dir` (so a moved run resumes where it is).

    A run directory may come from someone else: a `module:` model name or an `imports:` module in its config.yaml
    (which would import and run code) is refused unless `allow_code` (`--allow-code`); one given by an override
    is the user's own.
    """
    run_dir = Path(run_dir)
    if run_dir.name in ("", ".", ".."):  # `--resume .` from inside the run: its own name, not an empty one
        run_dir = run_dir.resolve()
    if not (run_dir / CONFIG_FILE).is_file():
        raise DistillabError(f"{run_dir}: not a run directory (no {CONFIG_FILE})")
    cfg = load_config(run_dir / CONFIG_FILE, overrides, allow_code=allow_code)
    if not allow_code:
        given = {item.partition("=")[0].strip() for item in overrides}
        for role in ("student", "teacher"):
            model = getattr(cfg, role)
            if model is not None and model.name.startswith(CODE_PREFIX) and f"{role}.name" not in given:
                raise ConfigError(f"{run_dir / CONFIG_FILE}: {role}.name {model.name!r} imports and runs code, and "
                                  "this config was read from a run directory, not given by you: pass --allow-code "
                                  "if you trust it")
    return cfg.model_copy(update={"output_dir": run_dir.parent, "name": run_dir.name})
