"""`distillab export`: a run's deployed network, rebuilt from its last checkpoint, as safetensors, ONNX or a
`torch.export` program.

The method is rebuilt from the run's config (teacher weights and data included, for the shapes), its trained
state is loaded from `checkpoints/last.pt` (`run.restore_method`), and its `deploy()` gives the network to ship:
the method's to define (the plain student for most; RDR merges its branches into it, SimKD adds its projector and
the teacher's classifier).

Every format carries a model card (`distillab` metadata, JSON): the student's model name and kwargs, the method's
`deploy_card()` entries (what rebuilds its deployed network around that student), the number of classes, the input
size and the normalisation ((x / 255 - mean) / std per channel), so that the file can be rebuilt and fed without
the run directory. safetensors holds the weights only: `load_exported` rebuilds the network from the card. ONNX and
`torch.export` hold the graph too, with a dynamic batch dimension (input `images`, output `logits`).

An outside student's card also names the version of the package that built it (`packages`); an `hf:` student's
carries its transformers config (`hf_config`), so that it rebuilds without the directory it was built from. A
`module:` student rebuilds by importing its module, which runs code: only with `allow_code`.
"""

from __future__ import annotations

import json
import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distillab.data import DataSplits
from distillab.engine.checkpoint import atomic_write, describe_write_failure, save_safetensors
from distillab.errors import CheckpointError, ConfigError, DistillabError
from distillab.run import check_new_file, restore_method

FORMATS = {"safetensors": ".safetensors", "onnx": ".onnx", "torch-export": ".pt2"}
EXPORT_STEM = "exported_student"
EXPORT_FILE = EXPORT_STEM + FORMATS["safetensors"]
CARD_KEY = "distillab"
CARD_VERSION = 3  # 2: `deploy` (the method's deploy_card entries); a card without it (1) is the plain student.
# 3: `packages` and `hf_config` for outside students; an `hf:` card without `hf_config` (2) names its directory
CODE_PREFIX = "module:"


@dataclass
class Exported:
    """What `export_run` wrote."""

    path: Path
    model: str
    method: str
    parameters: int
    epoch: int
    step: int
    format: str


def model_card(model: str, kwargs: dict[str, Any], data: DataSplits, method: str, fused_bn: bool = False,
               deploy: dict[str, Any] | None = None, student: nn.Module | None = None) -> dict[str, Any]:
    """What rebuilds and feeds an exported network: the student `model(**kwargs)`, turned into the deployed
    network by `method`'s `rebuild_deployed` with the `deploy` entries (its `deploy_card()`) where there are any.
    For an outside `student` (the built model), what its name alone does not give (`outside.card_entries`)."""
    from distillab.models import outside

    train = data.train
    return {"version": CARD_VERSION, "model": model, "kwargs": kwargs, "num_classes": data.num_classes,
            "input_size": list(data.image_shape), "mean": list(train.mean), "std": list(train.std),
            "input": "float32 N x C x H x W, (pixels / 255 - mean) / std per channel", "method": method,
            "fused_bn": fused_bn, "deploy": dict(deploy or {}),
            **(outside.card_entries(model, student) if student is not None else {})}


def export_run(run_dir: str | Path, output: str | Path | None = None, overrides: list[str] = (),
               format: str = "safetensors", force: bool = False, allow_code: bool = False) -> Exported:
    """Write the deployed network of `run_dir` to `output` (default `RUN_DIR/exported_student.<ext>`).

    `overrides` change fields of the run's config first (e.g. `method.options.fuse_bn=true`, `data.root=...`).
    An existing file is replaced only with `force` (see `check_output`); `allow_code`: see `load_run_config`.
    """
    if format not in FORMATS:
        raise ConfigError(f"--format {format!r}: choose one of {', '.join(FORMATS)}")
    run_dir = Path(run_dir)
    path = Path(output) if output is not None else run_dir / (EXPORT_STEM + FORMATS[format])
    check_output(path, run_dir, force, FORMATS[format])
    cfg, data, method, state = restore_method(run_dir, overrides, allow_code)
    network = method.deploy()
    method.close()  # the method's feature taps off the student before it is traced
    card = model_card(cfg.student.name, cfg.student.kwargs, data, cfg.method.name, method.deploy_folds_bn,
                      method.deploy_card(), student=network)
    try:
        export_model(network, path, card, format, replace=force)
    except FileExistsError:
        raise DistillabError(f"--output {path} was written by another process meanwhile: pass --force to replace "
                             "it, or name a new file") from None
    except (OSError, RuntimeError) as exc:
        raise DistillabError(f"{describe_write_failure(exc)} while writing {path}") from None
    return Exported(path, cfg.student.name, cfg.method.name, sum(p.numel() for p in network.parameters()),
                    state["epoch"], state["step"], format)


def check_output(path: Path, run_dir: Path, force: bool, suffix: str) -> None:
    """Where an export may write: never inside a run directory other than `run_dir` (nor its stages), inside
    `run_dir` only beside its files and never over one of them, and over an existing file only with `force`."""
    own, target = run_dir.resolve(), path.expanduser().resolve()
    if own not in target.parents:
        check_new_file(path, force)
        return
    if target.parent != own:
        raise DistillabError(f"--output {path}: inside the run's {target.parent.relative_to(own)} folder, which "
                             "holds the run's own files: write beside them, or outside the run")
    if path.is_dir():
        raise DistillabError(f"--output {path} is a directory: name the {suffix} file to write")
    if path.exists() and not _is_export(path):
        raise DistillabError(f"--output {path}: one of the run's own files, which export never replaces")
    if path.exists() and not force:
        raise DistillabError(f"--output {path} exists: pass --force to replace it, or name a new file")


def _is_export(path: Path) -> bool:
    try:
        read_card(path)
    except Exception:  # any file that does not read as an export is not one
        return False
    return True


def export_model(model: nn.Module, path: Path, card: dict[str, Any], format: str = "safetensors",
                 replace: bool = True) -> None:
    """Write `model` (in eval mode) with its model card in `format`; with `replace=False` an existing `path` is
    left alone (FileExistsError)."""
    model = model.eval()
    path = Path(path)
    if format == "safetensors":
        save_safetensors(model, path, metadata={"model": card["model"], "method": card["method"],
                                                CARD_KEY: json.dumps(card)}, replace=replace)
        return
    param = next(model.parameters())
    example = torch.zeros(2, *card["input_size"], dtype=param.dtype, device=param.device)
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    if format == "onnx":
        _write_onnx(model, example, batch, path, card, replace)
    else:
        program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
        atomic_write(path, lambda tmp: torch.export.save(program, tmp, extra_files={CARD_KEY: json.dumps(card)}),
                     replace)


def _write_onnx(model: nn.Module, example: torch.Tensor, batch, path: Path, card: dict[str, Any],
                replace: bool) -> None:
    try:
        import onnx
        import onnxscript  # noqa: F401  (the torch.export-based exporter needs it)
    except ImportError as exc:
        raise ConfigError(f"--format onnx needs the onnx extra (pip install distillab[onnx]): {exc}") from None
    exporter_log = logging.getLogger("torch.onnx")  # it notes each torchvision op it skips, on every export
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's deprecation notes of torch internals
            program = torch.onnx.export(model, (example,), input_names=["images"], output_names=["logits"],
                                        dynamic_shapes=({0: batch},), dynamo=True, verbose=False)
    finally:
        exporter_log.setLevel(level)
    proto = program.model_proto
    entry = proto.metadata_props.add()
    entry.key, entry.value = CARD_KEY, json.dumps(card)
    onnx.checker.check_model(proto)
    atomic_write(path, lambda tmp: onnx.save(proto, str(tmp)), replace)


def read_card(path: str | Path) -> dict[str, Any]:
    """The model card of an exported file of any format."""
    path = Path(path)
    if path.suffix == FORMATS["onnx"]:
        import onnx

        props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        text = props.get(CARD_KEY)
    elif path.suffix == FORMATS["torch-export"]:
        extra = {CARD_KEY: ""}
        torch.export.load(path, extra_files=extra)
        text = extra[CARD_KEY] or None
    else:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            text = (f.metadata() or {}).get(CARD_KEY)
    if not text:
        raise CheckpointError(f"{path}: no distillab model card (not written by `distillab export`?)")
    return json.loads(text)


def load_exported(path: str | Path, allow_code: bool = False) -> nn.Module:
    """The network of an exported safetensors file, rebuilt from its card and loaded strictly, in eval mode: the
    student, built from its name and kwargs (an `hf:` one from its card's transformers config), then (where the
    card has `deploy` entries) turned into the method's deployed network by the method's `rebuild_deployed`.

    A `module:` student is rebuilt by importing its module and calling its factory, which runs code: a file may
    come from someone else, so that needs `allow_code=True`. Any failure to rebuild is one line naming the model.
    """
    from distillab.engine.checkpoint import load_weights

    card = read_card(path)
    version = card.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version > CARD_VERSION:
        raise CheckpointError(f"{path}: model card version {version!r}; this distillab reads versions up to "
                              f"{CARD_VERSION} (upgrade distillab)")
    name = card.get("model")
    if card.get("fused_bn"):
        raise CheckpointError(f"{path}: its BN layers were folded into the convs (fuse_bn), so no stock "
                              f"{name} takes it: export it as onnx or torch-export instead")
    if not isinstance(name, str):
        raise CheckpointError(f"{path}: its model card names no model")
    if name.startswith(CODE_PREFIX) and not allow_code:
        raise CheckpointError(f"{path}: its student {name!r} is rebuilt by importing and running code, and the "
                              "file may come from someone else: pass allow_code=True if you trust it")
    try:
        model = _rebuild(card, name)
    except DistillabError as exc:
        why = re.sub(rf"^model '?{re.escape(name)}'?:? ", "", str(exc))  # the model is named here once
        packages = card.get("packages") if isinstance(card.get("packages"), dict) else {}
        written = ", ".join(f"{k} {v}" for k, v in packages.items())
        raise CheckpointError(f"{path}: cannot rebuild its network {name!r} from the card: {_first_line(why)}"
                              + (f" (the card was written with {written})" if written else "")) from None
    load_weights(model, Path(path), "exported network")
    return model.eval()


def _rebuild(card: dict[str, Any], name: str) -> nn.Module:
    """The card's deployed network, with fresh weights."""
    from distillab import methods, models
    from distillab.models import outside

    try:
        size = tuple(int(n) for n in card["input_size"])
        num_classes, kwargs = int(card["num_classes"]), dict(card.get("kwargs") or {})
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"a malformed card ({type(exc).__name__}: {exc})") from None
    if "hf_config" in card:
        model = outside.build_hf_from_config(name, card["hf_config"], size)
    else:
        try:
            model = models.build(name, num_classes=num_classes, in_channels=size[0], input_size=size, **kwargs)
        except ConfigError as exc:
            if name.startswith("hf:") and "neither a directory" in str(exc):  # a version 2 card names its directory
                raise ConfigError(f"this card (version {card['version']}) names the directory {name[3:]!r} as it was "
                                  "given at export, and there is none here: load it from that working directory, "
                                  "or export the run again") from None
            raise
    entries = card.get("deploy") or {}
    if entries:
        model = methods.get(card["method"]).rebuild_deployed(model, entries)
    return model


def _first_line(text: str, limit: int = 300) -> str:
    line = (text.strip().splitlines() or [""])[0]
    return line if len(line) <= limit else line[:limit - 3] + "..."
