"""Reading run configs: YAML with bounded size, `base:` files, `--set a.b=c` overrides, the shipped configs, and
the checks against the registries (dataset and method names, method options) that the schema cannot make."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from distillab import methods, published
from distillab.config import MethodConfig, RunConfig, format_validation_error
from distillab.data import registry as data_registry
from distillab.errors import ConfigError, DistillabError, UnknownNameError

MAX_YAML_NODES = 100_000  # after expanding aliases: a config has hundreds; an "alias bomb" expands into billions
MAX_YAML_DEPTH = 64  # a config nests a few levels; 50,000 brackets would exhaust the composer's recursion


class BoundedLoader(yaml.SafeLoader):
    """yaml.SafeLoader that bounds a document's expanded size (each alias counted as the nodes it repeats) and
    nesting depth, and refuses a mapping that names a key twice (YAML's "last one wins" hides typos)."""

    def __init__(self, stream) -> None:
        super().__init__(stream)
        self._depth = 0
        self._sizes: dict[int, int] = {}  # id(node) -> its node count with aliases expanded

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                mark = self.peek_event().start_mark
                raise ConfigError(f"YAML nested more than {MAX_YAML_DEPTH} levels deep (line {mark.line + 1}): "
                                  "refused")
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if id(node) not in self._sizes:  # an alias returns a node already counted: its size is added below
            children = (node.value if isinstance(node, yaml.SequenceNode) else
                        [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else [])
            size = 1 + sum(self._sizes[id(child)] for child in children)
            if size > MAX_YAML_NODES:
                raise ConfigError(f"YAML expands to more than {MAX_YAML_NODES:,} nodes (line "
                                  f"{node.start_mark.line + 1}; aliases counted as what they repeat): refused, as "
                                  "an alias bomb would exhaust memory")
            self._sizes[id(node)] = size
        return node

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[tuple[str, str], int] = {}
            for key, _value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                    line = key.start_mark.line + 1
                    if (key.tag, key.value) in seen:
                        raise ConfigError(f"key {key.value!r} appears twice in one mapping (lines "
                                          f"{seen[key.tag, key.value]} and {line}): keep one")
                    seen[key.tag, key.value] = line
        return super().construct_mapping(node, deep=deep)


def safe_yaml(text: str, where: str = "") -> Any:
    """Parse YAML with safe types and bounded aliases; errors are ConfigErrors naming `where`."""
    try:
        return yaml.load(text, Loader=BoundedLoader)
    except ConfigError as exc:
        raise ConfigError(f"{where}{exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{where}not valid YAML{at}: {getattr(exc, 'problem', None) or exc}") from None


def read_text(path: Path) -> str:
    """A config file's text; a binary or unreadable file is a ConfigError naming it."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (UTF-8 YAML expected)") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None


def apply_override(tree: dict[str, Any], assignment: str) -> None:
    """Apply `a.b.c=value` to a nested dict; the value is parsed as YAML (`1e-3`, `true`, `[1, 2]`)."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected key=value, e.g. --set train.epochs=10")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set {assignment!r}: empty part in key {key!r}")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {assignment!r}: {part!r} holds a value, not a section")
        node = child
    node[parts[-1]] = safe_yaml(raw, f"--set {assignment!r}: ") if raw.strip() else None


BASE_KEY = "base"


def merge(into: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """Deep merge: sections merge key by key, anything else in `other` replaces."""
    out = dict(into)
    for key, value in other.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def read_with_bases(path: Path, tree: dict[str, Any], seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Resolve `base: other.yaml` (relative to the file): the base's keys, overridden by the file's."""
    if BASE_KEY not in tree:
        return tree
    base_path = (path.parent / str(tree.pop(BASE_KEY))).resolve()
    if base_path in seen:
        raise ConfigError(f"{path}: base {base_path} includes itself")
    if not base_path.is_file():
        raise ConfigError(f"{path}: base config {base_path} does not exist")
    base = safe_yaml(read_text(base_path), f"{base_path}: ") or {}
    if not isinstance(base, dict):
        raise ConfigError(f"{base_path}: expected a mapping of keys at the top level")
    return merge(read_with_bases(base_path, base, (*seen, base_path)), tree)


PACKAGED_CONFIGS = Path(__file__).parent / "configs"  # the shipped configs, also in an installed wheel


def packaged_config(path: Path) -> Path | None:
    """The shipped config that a missing `configs/...` path names (so the README's commands work outside a
    checkout), or None."""
    parts = Path(path).parts
    if len(parts) < 2 or parts[0] != "configs":
        return None
    candidate = PACKAGED_CONFIGS.joinpath(*parts[1:])
    return candidate if candidate.is_file() else None


def config_that_trains(run_dir: Path, model: str) -> str | None:
    """The shipped config whose run directory is `run_dir` (as the config names it, relative) and whose student is
    `model`, as `configs/...`; None when there is none."""
    run_dir = Path(run_dir)
    if len(run_dir.parts) < 2 or run_dir.is_absolute():
        return None
    for path in sorted(PACKAGED_CONFIGS.rglob("*.yaml")):
        if f"name: {run_dir.name}" not in path.read_text(encoding="utf-8", errors="replace"):
            continue  # most configs name no run: their bases need not be read
        try:
            tree = read_config_file(path)
        except DistillabError:
            continue
        student = tree.get("student")
        if (Path(str(tree.get("output_dir", "runs"))) / str(tree.get("name")) == run_dir
                and isinstance(student, dict) and student.get("name") == model):
            return f"configs/{path.relative_to(PACKAGED_CONFIGS).as_posix()}"
    return None


def read_config_file(path: Path) -> dict[str, Any]:
    """A YAML config file's keys, its `base:` files resolved; a missing `configs/...` path falls back to the
    shipped config of that name."""
    if not path.is_file():
        path = packaged_config(path) or path
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    loaded = safe_yaml(read_text(path), f"{path}: ") or {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level")
    return read_with_bases(path, loaded)


def load_config(path: str | Path | None, overrides: list[str] = (), base: dict[str, Any] | None = None,
                layers: list[Path] = (), allow_code: bool = True) -> RunConfig:
    """Read a YAML run config (following `base:` files), lay the `layers` files over it (each one's keys
    replace the config's, as a budget replaces a method config's), apply overrides, import its `imports:`
    (see `import_plugins` for `allow_code`), validate.

    Raises ConfigError with one clear line naming the file and field.
    """
    tree: dict[str, Any] = dict(base or {})
    where = "" if path is None else f"{path}: "
    for file in ([] if path is None else [path]) + list(layers):
        tree = merge(tree, read_config_file(Path(file)))
    for assignment in overrides:
        apply_override(tree, assignment)
    given = any(assignment.partition("=")[0].strip() == "imports" for assignment in overrides)
    import_plugins(tree.get("imports"), where, allow_code or given)
    try:
        cfg = RunConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, RunConfig, where)) from None
    try:
        data_registry.get(cfg.data.name)
    except UnknownNameError as exc:
        raise ConfigError(f"{where}data.name: {exc}") from None
    check_method(cfg.method, where)
    published.check_config(cfg, where)
    return cfg


def import_plugins(modules: Any, where: str = "", allow_code: bool = True) -> None:
    """Import the modules a config's `imports:` names (plug-ins that register methods, models or datasets), from
    the installed packages, PYTHONPATH or the current directory. Importing runs their code: without
    `allow_code`, a module not imported yet is refused (a config read back from a run directory)."""
    if modules is None:
        return
    if not isinstance(modules, list) or not all(isinstance(m, str) and m.strip() for m in modules):
        raise ConfigError(f"{where}imports: expected a list of module names, got {modules!r}")
    for name in modules:
        if name in sys.modules:
            continue
        if not allow_code:
            raise ConfigError(f"{where}imports: {name!r} would import and run code, and this config was read from "
                              "a run directory, not given by you: pass --allow-code if you trust it")
        cwd = os.getcwd()
        added = cwd not in sys.path
        if added:
            sys.path.append(cwd)
        try:
            importlib.import_module(name)
        except Exception as exc:  # the plug-in's own code: whatever it raises, name it
            first = (str(exc).strip().splitlines() or [""])[0]
            raise ConfigError(f"{where}imports: {name!r} does not import: {type(exc).__name__}: {first}") from None
        finally:
            if added:
                sys.path.remove(cwd)


def check_method(method: MethodConfig, where: str = "") -> None:
    """The method is registered and its options fit its Options model: checked with the config, before any data
    or teacher is loaded (a suite refuses a typo in its last entry before its first run)."""
    try:
        cls = methods.get(method.name)
    except DistillabError as exc:
        raise ConfigError(f"{where}method.name: {exc}") from None
    try:
        options = cls.Options(**method.options)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, cls.Options, f"{where}method.options.")) from None
    # the options as given, under today's names (old names of renamed options replaced): the form runs compare by
    method.options = options.model_dump(mode="json", exclude_unset=True)


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
