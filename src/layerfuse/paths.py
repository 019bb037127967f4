"""Paths checked before any work: a file or folder that is read, a file or folder that will be made.

A command checks every path it reads or writes first, so that a bad one fails at once with a
clear `ArgumentValueError`, not after the work as a traceback. A check reads a byte of each file
read, and makes (and at once drops) a nameless file in each folder written to: what it finds is
what the work will find, permissions, read-only disks and all.

>>> import pathlib, tempfile
>>> folder = pathlib.Path(tempfile.mkdtemp())
>>> check_writable(folder / "out.npy", "the output")
>>> check_writable(folder / "missing" / "out.npy", "the output")  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
layerfuse.errors.ArgumentValueError: cannot write the output to .../missing/out.npy: .../missing does not exist
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import ArgumentValueError


def check_readable(path: str | os.PathLike[str], what: str) -> None:
    """Raise unless `path` is a file that can be read, or a folder whose files (not those of its subfolders) can."""
    path = Path(path)
    try:
        files = [entry.path for entry in os.scandir(path) if entry.is_file()] if path.is_dir() else [path]
        for name in files:
            with open(name, "rb") as file:
                file.read(1)
    except OSError as error:
        where = "" if error.filename in (None, str(path)) else f"{error.filename}: "
        raise ArgumentValueError(f"cannot read {what} {path}: {where}{error.strerror}") from error


def check_writable(path: str | os.PathLike[str], what: str, *, folder: bool = False) -> None:
    """Raise unless a file (a folder, with `folder`) can be made at `path`, replacing one that is there.

    The folder it goes into must exist and take new files; an existing folder at `path` must take
    new files itself (`folder`), and is refused where a file is to be written.
    """
    path = Path(path)
    parent = path.absolute().parent
    if folder and path.exists() and not path.is_dir():
        raise ArgumentValueError(f"cannot write {what} to {path}: it is a file, not a folder; move it away")
    if not folder and path.is_dir():
        raise ArgumentValueError(f"cannot write {what} to {path}: it is a folder; name a file")
    if not parent.is_dir():
        state = "is a file, not a folder" if parent.exists() else "does not exist"
        raise ArgumentValueError(f"cannot write {what} to {path}: {parent} {state}")
    for where in (parent, path) if folder and path.is_dir() else (parent,):
        try:
            tempfile.TemporaryFile(dir=where).close()
        except OSError as error:
            raise ArgumentValueError(f"cannot write {what} to {path}: {where}: {error.strerror}") from error
