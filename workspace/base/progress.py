"""Progress bars for long work: counts, rate and ETA, on stderr, quiet when asked."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

QUIET_ENV = "MAMMO_QUIET"


def progress(iterable: Iterable[T] | None = None, *, total: int | None = None, desc: str = "",
             unit: str = "it", leave: bool = True) -> Iterator[T] | tqdm:
    """A tqdm bar (``{n}/{total} [elapsed<eta, rate]``); disabled when ``MAMMO_QUIET=1``."""
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, dynamic_ncols=True,
                disable=os.environ.get(QUIET_ENV) == "1", mininterval=0.5)
