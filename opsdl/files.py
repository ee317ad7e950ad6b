"""Files that survive a kill: written under a temporary name, synced to disk, then renamed; with the
permissions of any file the user creates (0666 less the umask), not a temporary file's 0600."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _user_file_mode() -> int:
    mask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return 0o666 & ~mask


def sync_folder(folder: Path) -> None:
    """Give every file under ``folder`` the usual mode and flush it, and the folders, to disk."""
    mode = _user_file_mode()
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            os.chmod(path, mode)
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        _sync_directory(Path(root))


def _sync_directory(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    """Write under a temporary name in the same folder, fsync, then rename: a kill never leaves
    half a file, and a crash of the machine never leaves a renamed empty one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _user_file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _sync_directory(path.parent)


def check_output_dir(out: Path, resume: bool, overwrite: bool) -> list[str]:
    """--out of a training run: a folder (or nothing yet), and an empty one unless the run continues
    (--resume) or starts over (--overwrite-output-dir); its entries. Needs no torch: the command line
    says it before anything loads."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: expected a folder, got a file")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if entries and not resume and not overwrite:
        raise ValueError(f"--out {out}: not empty ({', '.join(entries[:4])}{', ...' if len(entries) > 4 else ''}); "
                         "pass --resume to continue that run, --overwrite-output-dir to start it over, or "
                         "another --out")
    return entries
