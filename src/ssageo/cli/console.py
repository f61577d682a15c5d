"""How the command line shows the library's log records.

The library never prints: each module logs through ``logging.getLogger(__name__)``. The CLI
hangs one handler on the ``ssageo`` logger that writes each record's message on stderr with rich
(warnings yellow, errors red), above any progress bar that is on the screen.
"""

from __future__ import annotations

import contextlib
import logging
import sys

# Training's lines keep the tag they always had: they interleave with its progress bars and,
# under torchrun, with the other processes' output.
TAGS = {"ssageo.train": "[train] "}


class CliHandler(logging.Handler):
    """Renders ``ssageo`` log records for a person at a terminal (or a log file via 2>)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from rich.console import Console
            from rich.text import Text

            tag = next((t for name, t in TAGS.items()
                        if record.name == name or record.name.startswith(name + ".")), "")
            style = ("red" if record.levelno >= logging.ERROR
                     else "yellow" if record.levelno >= logging.WARNING else "")
            text = Text(tag + record.getMessage(), style=style)
            with _above_tqdm_bars():
                # sys.stderr looked up now: a rich progress display or a test may have replaced it
                Console(file=sys.stderr).print(text, soft_wrap=True, highlight=False)
        except Exception:  # noqa: BLE001 - logging's own policy: report, never raise
            self.handleError(record)


def _above_tqdm_bars() -> contextlib.AbstractContextManager[object]:
    """Clears tqdm's bars on stderr while a line is written, and redraws them after."""
    if "tqdm" not in sys.modules:  # no bar can be on the screen
        return contextlib.nullcontext()
    from tqdm import tqdm

    return tqdm.external_write_mode(file=sys.stderr)


def install(level: int = logging.INFO) -> None:
    """Show ``ssageo``'s records from ``level`` up through :class:`CliHandler` (once)."""
    logger = logging.getLogger("ssageo")
    if not any(isinstance(h, CliHandler) for h in logger.handlers):
        logger.addHandler(CliHandler())
    logger.setLevel(level)
