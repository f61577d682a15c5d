"""Real file-system faults for tests: a full disk and a read-only folder, for root too.

Both run a command in a private user + mount namespace (``unshare --user --map-root-user
--mount``, no privileges needed where unprivileged user namespaces are enabled), where

- ``full``: a fresh tmpfs of a few kB is mounted at a folder: writes fail with ENOSPC, exactly
  as on a full disk (the kernel's own error, not a simulation);
- ``read_only``: a folder is bind-mounted read-only over itself: writes fail with EROFS,
  whoever the user is (``chmod 0o555`` does not stop root, under which the tests may run).

The mounts vanish with the namespace, so what the command left on the tmpfs is listed from
inside it, before it goes, as ``{relative path: size}``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# Lists what is left in the folder: {relative path: [size, "ok" or why the image is broken]}.
_LIST = """
import json, os, sys
from PIL import Image
root, found = sys.argv[1], {}
for d, _, names in os.walk(root):
    for name in names:
        path = os.path.join(d, name)
        state = "ok"
        if name.lower().endswith((".jpg", ".png")):
            try:
                with Image.open(path) as im:
                    im.load()
            except Exception as exc:
                state = repr(exc)
        found[os.path.relpath(path, root)] = [os.path.getsize(path), state]
print(json.dumps(found))
"""


def namespaces_work() -> bool:
    """True when ``unshare -rm`` can mount here (user namespaces enabled, util-linux there)."""
    if shutil.which("unshare") is None:
        return False
    probe = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
             "mount -t tmpfs -o size=4k probe /mnt 2>/dev/null || mount -t tmpfs probe /tmp"]
    return subprocess.run(probe, capture_output=True).returncode == 0


needs_namespaces = pytest.mark.skipif(
    not namespaces_work(),
    reason="needs `unshare --user --map-root-user --mount` (unprivileged user namespaces) to "
           "mount a small tmpfs / a read-only bind mount")


def run_faulty(fault: str, folder: Path, argv: list[str], size_kb: int = 64, fill: bool = False,
               timeout: float = 300) -> tuple[subprocess.CompletedProcess, dict[str, list]]:
    """Run ``argv`` with ``folder`` full (``fault="full"``: a ``size_kb`` tmpfs mounted on it,
    so it starts empty; ``fill`` first fills it to the last byte) or read-only
    (``fault="read_only"``: its current content, unwritable). Returns (the command's result,
    ``{path relative to folder: [size, "ok" or why an image does not decode]}`` of what is
    left, a filler file excepted)."""
    folder.mkdir(parents=True, exist_ok=True)
    if fault == "full":
        mount = f'mount -t tmpfs -o size={size_kb}k ssageo-full "$0"'
        if fill:
            mount += ' && { cat /dev/zero > "$0/.filler"; true; } 2>/dev/null'
    elif fault == "read_only":
        mount = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0"'
    else:
        raise ValueError(fault)
    listing = folder.parent / f".{folder.name}.listing.json"
    script = (f'{mount} || exit 97; "$@"; rc=$?; '
              f'"{sys.executable}" -c "$LIST" "$0" > "{listing}"; exit $rc')
    result = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, str(folder),
         *argv], capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1", "LIST": _LIST})
    assert result.returncode != 97, f"mount failed: {result.stderr}"
    files = json.loads(listing.read_text()) if listing.is_file() else {}
    files.pop(".filler", None)
    listing.unlink(missing_ok=True)
    return result, files


def ssageo(*args) -> list[str]:
    """The argv of the ``ssageo`` CLI in this interpreter."""
    return [sys.executable, "-m", "ssageo", *map(str, args)]
