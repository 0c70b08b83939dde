"""A progress bar for the bench: tqdm's when it is installed (the bench extra), else one line per item on stderr
(machines without tqdm, e.g. a GPU box with no network, still run the bench)."""
from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], *, desc: str, unit: str) -> Iterator[T]:
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _lines(items, desc, unit)
    return iter(tqdm(items, desc=desc, unit=unit, file=sys.stderr))


def _lines(items: Iterable[T], desc: str, unit: str) -> Iterator[T]:
    items = list(items)
    start = time.perf_counter()
    for i, item in enumerate(items):
        print(f"{desc}: {unit} {i + 1}/{len(items)} ({time.perf_counter() - start:.0f} s so far)", file=sys.stderr,
              flush=True)
        yield item
    print(f"{desc}: {len(items)} {unit}(s) in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
