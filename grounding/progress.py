"""The project's one progress bar: rich on stderr, ``label  bar  M/N  fields  time left``, or a no-op."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping


@contextmanager
def progress_bar(total: int, label: str, *, enabled: bool = True, completed: int = 0,
                 fields: Mapping[str, str] | None = None) -> Iterator[Callable[..., None]]:
    """Show a bar of ``total`` steps (``completed`` of them done) while the block runs; yield ``advance``.

    ``advance(n=1, **values)`` adds ``n`` done steps and sets the named fields to ``values``.

    ``fields`` maps a field name to how it reads, ``{}`` standing for its value (``{"loss": "loss {}"}``,
    ``{"rate": "{} sent/s"}``); a field shows ``-`` until ``advance`` gives it a value. ``enabled=False``
    shows nothing and ``advance`` does nothing.
    """
    if not enabled:
        yield lambda n=1, **values: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    fields = fields or {}
    text = "  ".join(shown.replace("{}", f"{{task.fields[{name}]}}") for name, shown in fields.items())
    with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                  *([TextColumn(text)] if fields else []), TimeRemainingColumn(), console=Console(stderr=True)) as bar:
        task = bar.add_task(label, total=total, completed=completed, **{name: "-" for name in fields})

        def advance(n: int = 1, **values: Any) -> None:
            bar.update(task, advance=n, **values)
        yield advance
