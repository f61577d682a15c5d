"""What the prior labels of a dataset were made with: ``ROOT/priors-run.json``.

A rerun of ``ssageo priors`` skips tiles that already have a label. That is only right when
those labels were made with the same backend and parameters, so every run records them and a
rerun with others is refused (naming what differs) unless ``--force``. A ``--force`` run marks
the record ``redo`` and lists each tile it has rewritten in ``priors-run.done``: when it is
interrupted, a rerun with the same parameters redoes exactly the tiles not listed, instead of
keeping their old labels beside the new ones.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ssageo.config import ConfigError
from ssageo.io import DataError, atomic_write_text, write_error

RECORD_FILE = "priors-run.json"
DONE_FILE = "priors-run.done"


def _plain(parameters: dict[str, Any]) -> dict[str, Any]:
    """The parameters as JSON gives them back (tuples -> lists, paths -> text)."""
    return json.loads(json.dumps(parameters, sort_keys=True, default=str))


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return [f"{key} ({old.get(key, 'unset')!r} -> {new.get(key, 'unset')!r})"
            for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]


class LabelRecord:
    """The record of the labels under ``root``; ``open`` checks it against ``parameters``
    (nothing is written until ``start``)."""

    def __init__(self, root: Path, parameters: dict[str, Any], redo: bool, existed: bool) -> None:
        self.root = Path(root)
        self.parameters = parameters
        self.redo = redo
        self.existed = existed
        self.done: set[str] = set()

    @property
    def path(self) -> Path:
        return self.root / RECORD_FILE

    @property
    def done_path(self) -> Path:
        return self.root / DONE_FILE

    @classmethod
    def open(cls, root: Path, parameters: dict[str, Any], force: bool) -> LabelRecord:
        """Check the record under ``root``: ConfigError when its parameters differ from
        ``parameters`` and ``force`` is not set; DataError when it cannot be read."""
        root, parameters = Path(root), _plain(parameters)
        path = root / RECORD_FILE
        if force or not path.exists():
            return cls(root, parameters, redo=force, existed=path.exists())
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
            old_parameters, redo = old["parameters"], bool(old["redo"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{path}: not a readable record of the prior labels ({exc}); "
                            "pass --force to redo every label") from None
        changed = _differences(old_parameters, parameters)
        if changed:
            raise ConfigError(
                f"{path}: the labels there were made with other parameters: "
                f"{', '.join(changed)}; rerun with the same ones to resume, or pass --force "
                "to redo every label"
            )
        record = cls(root, parameters, redo=redo, existed=True)
        if redo and record.done_path.is_file():
            lines = record.done_path.read_text(encoding="utf-8").split("\n")
            record.done = set(lines[:-1])  # the last piece may be cut short by a crash
        return record

    def start(self, force: bool) -> None:
        """Write the record (the run's first write); a ``force`` run starts a new done list."""
        if force:
            atomic_write_text(self.done_path, "")
        atomic_write_text(self.path, json.dumps(
            {"parameters": self.parameters, "redo": self.redo}, indent=1, sort_keys=True) + "\n")

    def is_current(self, rel: str) -> bool:
        """False for a tile whose existing label an unfinished ``--force`` run has not redone."""
        return not self.redo or rel in self.done

    def mark(self, rels: Iterable[str]) -> None:
        """Note tiles rewritten by a ``--force`` run (after their labels are in place)."""
        if self.redo:
            try:
                with self.done_path.open("a", encoding="utf-8") as handle:
                    handle.write("".join(f"{rel}\n" for rel in rels))
            except OSError as exc:
                raise write_error(self.done_path, exc) from None

    def finish(self) -> None:
        """Every tile of the dataset is redone: the record is an ordinary one again."""
        if self.redo:
            self.redo = False
            self.start(force=False)
            self.done_path.unlink(missing_ok=True)
