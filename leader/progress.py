"""One rich progress view for every long step, so each command shows rate and time left."""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)


def quiet() -> bool:
    """Progress bars are off in tests and pipes unless LEADER_PROGRESS=1 asks for them."""
    flag = os.environ.get("LEADER_PROGRESS")
    if flag is not None:
        return flag == "0"
    return not sys.stderr.isatty()


@contextlib.contextmanager
def progress(unit: str = "items") -> Iterator[Progress]:
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=console, disable=quiet(), transient=False) as bar:
        yield bar


def rate_text(done: float, seconds: float, unit: str) -> str:
    return f"{done / seconds:,.1f} {unit}/s" if seconds > 0 else ""
