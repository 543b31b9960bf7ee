"""Registries by name (methods, models, datasets): one class for registration, discovery, duplicates and
suggestions.

A registry discovers its built-ins by importing every module of its folder (adding one is adding one file), then
the plug-ins of installed packages: the modules named by the `distillab.plugins` entry-point group (a package
declares `[project.entry-points."distillab.plugins"] my_pkg = "my_pkg.distill"`; importing the module registers
what it defines). A config's `imports:` list does the same for modules that are not installed packages.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path
from typing import Generic, TypeVar

from distillab.errors import ConfigError, UnknownNameError

T = TypeVar("T")
PLUGIN_GROUP = "distillab.plugins"
_plugins_loaded = False


def load_plugins() -> None:
    """Import the modules of the `distillab.plugins` entry points, once; one that fails is a ConfigError naming
    it."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for point in entry_points(group=PLUGIN_GROUP):
        try:
            point.load()
        except Exception as exc:  # a plug-in's own code: whatever it raises, name it
            raise ConfigError(f"plug-in {point.name!r} ({point.value}, entry point group {PLUGIN_GROUP}) does not "
                              f"import: {type(exc).__name__}: {exc}") from None


class Registry(Generic[T]):
    """Things of one `kind` by name; built-ins are the modules of `package` in `folder` (`skip` excluded).
    `listing` tells where to see them all (default: the names themselves)."""

    def __init__(self, kind: str, package: str, folder: Path, listing: str = "", skip: tuple[str, ...] = ()
                 ) -> None:
        self.kind, self.package, self.folder, self.listing, self.skip = kind, package, Path(folder), listing, skip
        self._entries: dict[str, T] = {}
        self._discovered = False

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: register the decorated object under `name` (a second, different one is an error)."""

        def add(obj: T) -> T:
            if name in self._entries and self._entries[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj
            return obj

        return add

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)

    def available(self) -> dict[str, T]:
        """Every registered entry, sorted by name."""
        self._discover()
        return dict(sorted(self._entries.items()))

    def get(self, name: str) -> T:
        """The entry `name`; an unknown name gets the closest registered one as a suggestion."""
        entries = self.available()
        if name not in entries:
            close = difflib.get_close_matches(name, entries, n=1)
            if not self.listing:
                hint = f"did you mean {close[0]!r}?" if close else f"one of {', '.join(entries)}"
                raise UnknownNameError(f"unknown {self.kind} {name!r}; {hint}")
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise UnknownNameError(f"unknown {self.kind} {name!r}{hint} ({self.listing})")
        return entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self.available()

    def _discover(self) -> None:
        if self._discovered:
            return
        self._discovered = True
        for info in pkgutil.iter_modules([str(self.folder)]):
            if info.name not in self.skip:
                importlib.import_module(f"{self.package}.{info.name}")
        load_plugins()
