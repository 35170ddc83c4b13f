"""A ConfigDict read by the package below its entry points fails the test that made it.

The entry points (main.py, sft_jax/cli/, `loop.trainer.run`) turn the config into a RunSpec
(sft_jax/core/spec.py); tests/conftest.py installs this guard for the whole suite, so a
function below them that is handed (or reaches for) a ConfigDict is caught where it reads it,
not only by the static import rule of tests/test_structure.py.
"""

import sys
from pathlib import Path

import ml_collections

PACKAGE = Path(__file__).resolve().parents[1] / "sft_jax"
EDGES = (PACKAGE / "cli", PACKAGE / "core" / "spec.py")


class ConfigDictBelowTheEdgeError(RuntimeError):
    """Not an AttributeError: hasattr() and getattr(..., default) must not swallow it."""


def _check(depth: int) -> None:
    caller = Path(sys._getframe(depth).f_code.co_filename)
    if caller.is_relative_to(PACKAGE) and not any(
        caller == edge or caller.is_relative_to(edge) for edge in EDGES
    ):
        raise ConfigDictBelowTheEdgeError(
            f"{caller.relative_to(PACKAGE.parent)} reads a ConfigDict: below the entry points "
            "the package takes a RunSpec (RunSpec.of(config) in the test or at the edge)."
        )


def install() -> None:
    cls = ml_collections.ConfigDict
    if getattr(cls, "_sft_jax_guarded", False):
        return
    getattr_, getitem, get = cls.__getattr__, cls.__getitem__, cls.get

    def guarded_getattr(self, name):
        if not name.startswith("_"):
            _check(2)
        return getattr_(self, name)

    def guarded_getitem(self, key):
        _check(2)
        return getitem(self, key)

    def guarded_get(self, key, default=None):
        _check(2)
        return get(self, key, default)

    cls.__getattr__, cls.__getitem__, cls.get = guarded_getattr, guarded_getitem, guarded_get
    cls._sft_jax_guarded = True
