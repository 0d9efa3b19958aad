"""The one progress-bar helper.  Off with ``--no-progress``, on non-zero ranks, and when not a TTY."""

from __future__ import annotations

import sys
from typing import Iterable, Iterator, Optional, TypeVar

# What reaches the terminal besides medsynth's own lines is decided here too: third-party notices
# that are not the user's to act on go to DEBUG (medsynth.notices).  The CLI imports this module
# for every verb, before any stage runs.
import medsynth.notices  # noqa: F401  (installs the filters)
from medsynth.runtime import is_rank_zero

T = TypeVar("T")
_ENABLED: Optional[bool] = None


def set_progress(enabled: bool) -> None:
    global _ENABLED
    _ENABLED = enabled


def progress_enabled() -> bool:
    if not is_rank_zero():
        return False
    if _ENABLED is not None:
        return _ENABLED
    return sys.stderr.isatty()


def progress(iterable: Iterable[T], desc: str = "", total: Optional[int] = None, leave: bool = False) -> Iterator[T]:
    """Wrap ``iterable`` in a tqdm bar when progress is enabled, else return it unchanged."""
    if not progress_enabled():
        yield from iterable
        return
    from tqdm.auto import tqdm

    yield from tqdm(iterable, desc=desc, total=total, leave=leave, dynamic_ncols=True)
