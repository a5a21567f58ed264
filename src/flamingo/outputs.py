"""Writing outputs without ever leaving a half-written or mixed result.

Check first (an existing output is replaced only when the caller says so), build the new output
in a temporary folder next to the target (same file system), then rename it into place. An
error, Ctrl-C or a kill at any moment leaves the previous output or the new one, never a mix;
what a killed process leaves is a hidden `.NAME.tmp-*` folder that blocks nothing.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from flamingo.errors import UserError

OVERWRITE_HINT = "pass --overwrite (overwrite=True in Python) to replace it"


class OutputExistsError(UserError):
    """The output already exists and replacing it was not asked for (or is not safe)."""


class OutputWriteError(UserError):
    """The output cannot be written (disk full, read-only, no permission); nothing half-written stays."""


# errno values that say the output cannot be written (other OSErrors are not about the output)
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.ENOENT}


@contextlib.contextmanager
def _named_write_errors(target: Path) -> Iterator[None]:
    try:
        yield
    except OSError as err:
        if err.errno not in _WRITE_ERRNOS:
            raise
        raise OutputWriteError(f"{target} cannot be written: {err.strerror or err}") from None


def check_output_dir(target: str | Path, overwrite: bool, what: str, ours: Sequence[str] = ()) -> Path:
    """Refuse an existing, non-empty `target` folder unless `overwrite`; even then, refuse one that
    holds none of the names in `ours` (it is not an output of this kind: replacing it would delete
    someone's files). A file where a folder should be is always refused."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise OutputExistsError(f"{what} {target} exists and is not a folder")
    if not target.is_dir() or not any(target.iterdir()):
        return target
    if not overwrite:
        raise OutputExistsError(f"{what} {target} already exists and is not empty; {OVERWRITE_HINT}")
    if ours and not any((target / name).exists() for name in ours):
        raise OutputExistsError(f"{what} {target} is not empty and holds none of {', '.join(ours)}: "
                                f"refusing to replace it even with --overwrite")
    return target


def check_writable(target: str | Path, what: str, folder: bool) -> Path:
    """Find out before any work whether `target` can be written: a folder to create (with its
    parents) or fill when `folder`, else a file to create or replace in an existing folder.
    Refuses a file where a folder should be and the reverse, a missing folder for a file, and a
    read-only place; nothing is created."""
    target = Path(target)
    kind = "folder" if folder else "file"
    if target.exists() and target.is_dir() != folder:
        raise OutputWriteError(f"{what} {target} exists and is not a {kind}")
    existing = target if target.is_dir() else target.parent
    while not existing.exists():
        if not folder:
            raise OutputWriteError(f"{what}: the folder of {target} does not exist")
        existing = existing.parent  # created with its parents later
    if not existing.is_dir():
        raise OutputWriteError(f"{what} {target} cannot be created: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK) or (target.is_file() and not os.access(target, os.W_OK)):
        raise OutputWriteError(f"{what} {target} cannot be written: {existing} is read-only or not writable by "
                               f"this user")
    return target


@contextlib.contextmanager
def staging_dir(target: str | Path) -> Iterator[Path]:
    """A new, empty hidden folder next to `target`, removed when the block ends (after a failure,
    or when its content was not moved away with `publish`)."""
    target = Path(target)
    staged = target.parent / f".{target.name}.tmp-{secrets.token_hex(6)}"
    try:
        with _named_write_errors(target):
            target.parent.mkdir(parents=True, exist_ok=True)
            staged.mkdir()  # not tempfile.mkdtemp: the folder becomes the output, with the usual permissions
            yield staged
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def publish(staged: str | Path, target: str | Path) -> Path:
    """Rename `staged` (a file or folder) to `target`, replacing it. An existing `target` folder is
    first renamed out of the way and deleted afterwards, so `target` is at every moment the old
    output or the new one (or, after a crash between the two renames, absent with the old one kept
    as `.NAME.old-*/NAME`)."""
    staged, target = Path(staged), Path(target)
    if target.is_dir() and not target.is_symlink():  # a rename cannot replace a non-empty folder
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old / target.name)
        os.replace(staged, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staged, target)
    return target


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write a text file through a temporary file in the same folder and a rename; a full disk or
    a missing folder is an OutputWriteError naming the file."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{secrets.token_hex(4)}"
    try:
        with _named_write_errors(path):
            with open(tmp, "x", encoding="utf-8") as f:  # the usual permissions (umask), unlike mkstemp
                f.write(text)
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def cache_root() -> Path:
    """Where derived files are cached (converted LM weights, RICES features, WordNet):
    $FLAMINGO_CACHE, else $XDG_CACHE_HOME/flamingo, else ~/.cache/flamingo."""
    if os.environ.get("FLAMINGO_CACHE"):
        return Path(os.environ["FLAMINGO_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "flamingo"
