"""A progress bar for evaluation loops: tqdm when installed, else a plain stderr line every tenth."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], total: int | None, desc: str, enabled: bool = True) -> Iterator[T]:
    """Yield ``items`` while reporting progress on stderr; pass ``enabled=False`` on ranks other than 0."""
    if not enabled:
        yield from items
        return
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None:
        yield from tqdm(items, total=total, desc=desc, file=sys.stderr, leave=False)
        return
    step = max(1, (total or 0) // 10) if total else 100
    count = 0
    for count, item in enumerate(items, start=1):
        if count % step == 0:
            print(f"{desc}: {count}/{total if total else '?'}", file=sys.stderr, flush=True)
        yield item
    print(f"{desc}: done ({count})", file=sys.stderr, flush=True)
