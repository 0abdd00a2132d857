"""A small name -> object registry with did-you-mean errors (instead of if/elif chains)."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from moeprune.errors import MoePruneError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to objects; `get` raises a MoePruneError that lists the choices and suggests the closest."""

    def __init__(self, kind: str, hint: str = ""):
        self.kind = kind
        self.hint = hint
        self._items: dict[str, T] = {}

    def register(self, name: str, obj: T | None = None) -> Callable[[T], T] | T:
        """Use as `reg.register("name", obj)` or as a decorator `@reg.register("name")`."""

        def _add(o: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = o
            return o

        return _add(obj) if obj is not None else _add

    def get(self, name: str) -> T:
        if name in self._items:
            return self._items[name]
        close = difflib.get_close_matches(name, self._items, n=1)
        suggestion = f" Did you mean {close[0]!r}?" if close else ""
        raise MoePruneError(
            f"unknown {self.kind} {name!r}.{suggestion} Choose one of: {', '.join(sorted(self._items))}."
            + (f" {self.hint}" if self.hint else "")
        )

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def items(self) -> list[tuple[str, T]]:
        return sorted(self._items.items())
