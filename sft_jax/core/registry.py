"""A registry of named entries (objectives, adapter families, ...): the one place that
compares their names; everything else asks it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

from sft_jax.core.errors import check_choice

T = TypeVar("T")


class Registry(Generic[T]):
    """Entries by name, in registration order."""

    def __init__(self, what: str):
        self.what = what
        self.entries: dict[str, T] = {}

    def register(self, name: str, entry: T) -> T:
        if name in self.entries:
            raise ValueError(f"{self.what} {name!r} is registered twice")
        self.entries[name] = entry
        return entry

    def names(self) -> tuple[str, ...]:
        return tuple(self.entries)

    def get(self, field: str, name: str) -> T:
        """The entry `name`; a ConfigError naming config.`field` and the choices otherwise."""
        check_choice(field, name, self.names())
        return self.entries[name]

    def __iter__(self) -> Iterator[T]:
        return iter(tuple(self.entries.values()))
