"""Every poolkit name the README shows (``poolkit.x``, ``from poolkit.y import z``) exists: the public API the
restructure kept, checked against the text users copy from."""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from types import ModuleType

import pytest

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()

# `poolkit.a.b` written in the README, code or prose; not file paths (poolkit/...) nor file names (poolkit.toml).
_DOTTED = re.compile(r"(?<![\w/.-])poolkit(?:\.[A-Za-z_]\w*)+(?![\w/]|\.(?:toml|conf|txt)\b)")
_FROM = re.compile(r"^\s*from (poolkit(?:\.\w+)*) import \(?([\w, ]+)\)?", re.M)


def _resolve(dotted: str) -> object:
    """Import the longest module prefix of ``dotted`` and look the rest up as attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            value: object = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            value = getattr(value, attr)
        return value
    raise ModuleNotFoundError(dotted)


def _names() -> list[str]:
    found = set(_DOTTED.findall(README))
    for module, names in _FROM.findall(README):
        found.update(f"{module}.{name.strip()}" for name in names.split(",") if name.strip())
    return sorted(found)


def test_the_readme_names_enough_to_be_worth_checking() -> None:
    names = _names()
    assert {"poolkit.create_pool", "poolkit.metrics.asgi_app", "poolkit.money.idempotent"} <= set(names)
    assert len(names) >= 25


@pytest.mark.parametrize("dotted", _names())
def test_a_name_the_readme_shows_exists(dotted: str) -> None:
    _resolve(dotted)  # AttributeError or ModuleNotFoundError names what is gone


def test_poolkit_compare_is_the_function_not_its_module() -> None:
    import poolkit
    import poolkit.dev.compare  # importing the module must not shadow the function

    assert not isinstance(poolkit.compare, ModuleType)
    assert callable(poolkit.compare)
