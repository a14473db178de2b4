"""``**options`` keywords: the ``Unpack`` annotation, and the TypeError for a keyword
that is not an option."""

from __future__ import annotations

from typing import Collection, Iterable

try:  # re-exported, for the ``**options: Unpack[...]`` annotations
    from typing import Unpack
except ImportError:  # Python < 3.11 (torch depends on typing_extensions)
    from typing_extensions import Unpack  # noqa: F401


def check_keywords(name: str, given: Iterable[str], allowed: Collection[str]) -> None:
    """Raise the TypeError Python raises for a ``def``'s unknown keyword when a key of
    ``given`` (a function's ``**options``) is not in ``allowed``."""
    for key in given:
        if key not in allowed:
            raise TypeError(f"{name}() got an unexpected keyword argument {key!r}")
