"""Plug-ins and layering: a method from outside the package works from YAML and the CLI like a built-in one (the
README's example, run as written), entry points load, and no module of the package sits in an import cycle."""

import ast
import re
import shutil
import sys
from pathlib import Path

import pytest

import distillab.registry as registry_module
from distillab.cli import main
from distillab.config_files import load_config
from distillab.errors import ConfigError
from distillab.methods.base import METHODS

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"


def readme_block(first_line: str) -> str:
    """The README code block that starts with `first_line`."""
    for block in re.findall(r"```(?:python|yaml)\n(.*?)```", (ROOT / "README.md").read_text(), re.S):
        if block.startswith(first_line):
            return block
    raise AssertionError(f"no README block starts with {first_line!r}")


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch, untrained_digits_teacher):
    """The README's plug-in example in a fresh directory (the current one), unregistered again afterwards."""
    (tmp_path / "my_methods.py").write_text(readme_block("# my_methods.py"))
    (tmp_path / "my_kd.yaml").write_text(readme_block("# my_kd.yaml"))
    shutil.copy(untrained_digits_teacher, tmp_path / "teacher.safetensors")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(METHODS, "_entries", dict(METHODS._entries))
    yield tmp_path
    sys.modules.pop("my_methods", None)


def forget_plugin() -> None:
    """As a new process would be: the plug-in neither imported nor registered."""
    sys.modules.pop("my_methods", None)
    METHODS.unregister("my_kd")


def test_the_readme_plugin_trains_evaluates_resumes_and_exports_from_the_cli(plugin_dir, capsys):
    assert "my_kd" not in METHODS
    assert main(["train", "my_kd.yaml", "--set", "train.progress=false"]) == 0
    run = plugin_dir / "runs" / "my_kd_resnet8_digits_s0"
    assert (run / "summary.json").is_file() and "my_kd" in METHODS
    forget_plugin()
    capsys.readouterr()
    assert main(["eval", str(run)]) == 2  # a run directory's imports are code: not without --allow-code
    err = capsys.readouterr().err
    assert "imports: 'my_methods' would import and run code" in err and "--allow-code" in err
    assert "my_methods" not in sys.modules
    assert main(["eval", str(run), "--allow-code"]) == 0
    forget_plugin()
    assert main(["train", "--resume", str(run), "--set", "train.epochs=3", "--allow-code"]) == 0
    assert main(["export", str(run), "--allow-code"]) == 0
    assert (run / "exported_student.safetensors").is_file()


def test_an_import_that_fails_is_one_line(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("imports: [no_such_plugin_module]\nstudent: {name: resnet8}\n")
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "imports: 'no_such_plugin_module' does not import: ModuleNotFoundError" in err
    with pytest.raises(ConfigError, match="imports: expected a list of module names"):
        load_config(None, ["imports=my_methods"], base={"student": {"name": "resnet8"}})


class FakeEntryPoint:
    def __init__(self, name, action):
        self.name, self.value, self.action = name, f"{name}_pkg.plugin", action

    def load(self):
        return self.action()


def test_entry_point_plugins_register_and_a_broken_one_is_named(monkeypatch):
    from distillab.data import registry as data_registry

    monkeypatch.setattr(data_registry.DATASETS, "_entries", dict(data_registry.DATASETS._entries))
    monkeypatch.setattr(registry_module, "_plugins_loaded", False)
    monkeypatch.setattr(registry_module, "entry_points", lambda group: [
        FakeEntryPoint("tiny", lambda: data_registry.register("tiny_from_entry_point")(lambda cfg: None))])
    registry_module.load_plugins()
    assert "tiny_from_entry_point" in data_registry.available()

    def broken():
        raise RuntimeError("boom")

    monkeypatch.setattr(registry_module, "_plugins_loaded", False)
    monkeypatch.setattr(registry_module, "entry_points", lambda group: [FakeEntryPoint("bad", broken)])
    with pytest.raises(ConfigError, match=r"plug-in 'bad' \(bad_pkg.plugin, entry point group distillab.plugins\) "
                                          "does not import: RuntimeError: boom"):
        registry_module.load_plugins()


# ------------------------------------------------------------------------------------------------ layering
def import_graph() -> dict[str, set[str]]:
    """Every import between the package's modules, lazy and TYPE_CHECKING ones included; importing a submodule
    counts as importing its parent packages too."""
    modules = {}
    for path in (SRC / "distillab").rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                    base = ".".join(up + ([base] if base else []))
                targets.update(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                               for alias in node.names)
        deps = set()
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            parts = target.split(".")
            deps.add(target)  # imported by name: counts even if it is a package above this module
            deps.update(parent for parent in (".".join(parts[:i]) for i in range(2, len(parts)))
                        if not name.startswith(parent + "."))  # its packages, imported first (not our own ones)
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def test_no_module_of_the_package_sits_in_an_import_cycle():
    graph = import_graph()
    assert len(graph) > 70 and "distillab.config" in graph["distillab.run"]  # the graph is really read

    def reaches(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        return seen

    cycles = sorted(name for name in graph if name in reaches(name))
    assert cycles == [], f"modules in import cycles: {cycles}"


def test_the_config_schema_imports_nothing_of_distillab():
    assert {d for d in import_graph()["distillab.config"] if d != "distillab"} == set()
