"""Registries that plug-ins add to: simulator suites, policy families and acceleration methods.

A registry maps a name to a factory. Code inside the package and code outside it register the same way:
a module calls `registry.register(name)(factory)` when it is imported, and the module is found through
a Python entry point in the registry's group, as pip plug-ins are:

    # pyproject.toml of a plug-in (or of this package)
    [project.entry-points."vla_runtime.suites"]
    libero = "my_package.libero"

Entry points are read when a name is first looked up, and read again when a name is not found (a
plug-in installed, or put on sys.path, after the first lookup still shows up). Registering directly, e.g.
from a test, works without any entry point.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterable
from importlib.metadata import entry_points
from typing import Generic, TypeVar

T = TypeVar("T")


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """" (did you mean 'x'?)" for the closest of `choices` to a mistyped `name`, else ""."""
    close = difflib.get_close_matches(str(name), [str(choice) for choice in choices], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


class Registry(Generic[T]):
    def __init__(self, kind: str, group: str):
        self.kind = kind  # "simulator suite", "policy", ... for error messages
        self.group = group
        self._entries: dict[str, T] = {}
        self._loaded: set[str] = set()  # entry point values already imported

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(entry: T) -> T:
            if name in self._entries and self._entries[name] is not entry:
                raise ValueError(f"{self.kind.capitalize()} '{name}' is registered twice")
            self._entries[name] = entry
            return entry

        return decorator

    def _load_plugins(self) -> None:
        for point in entry_points(group=self.group):
            if point.value not in self._loaded:
                self._loaded.add(point.value)
                importlib.import_module(point.module)

    def names(self) -> list[str]:
        self._load_plugins()
        return sorted(self._entries)

    def get(self, name: str) -> T:
        if name not in self._entries:
            self._load_plugins()
        if name not in self._entries:
            raise ValueError(f"Unknown {self.kind} '{name}'{did_you_mean(name, self.names())}. "
                             f"Registered: {', '.join(self.names()) or 'none'}")
        return self._entries[name]

    def items(self) -> list[tuple[str, T]]:
        self._load_plugins()
        return list(self._entries.items())

    def unregister(self, name: str) -> None:
        """For tests that register something temporary."""
        self._entries.pop(name, None)

