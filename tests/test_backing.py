"""backing.reopen_named: the O_PATH descriptor of a just-created file, by its
name when the name still leads to it, through the open file when it does not
(a file renamed over it, a symlink put in its place, the name gone)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from credfs import backing


def _replace_with_file(d: Path) -> None:
    (d / "other").write_bytes(b"x")
    os.rename(d / "other", d / "a")


def _replace_with_symlink(d: Path) -> None:
    os.unlink(d / "a")
    os.symlink("elsewhere", d / "a")


def _remove(d: Path) -> None:
    os.unlink(d / "a")


def _flags(fd: int) -> int:
    with open(f"/proc/self/fdinfo/{fd}") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    return int(fields["flags"].strip(), 8)


@pytest.mark.parametrize("change", [None, _replace_with_file, _replace_with_symlink, _remove],
                         ids=["unchanged", "renamed-over", "symlink", "removed"])
def test_reopen_named_gives_the_open_file(
        tmp_path: Path, change: Callable[[Path], None] | None) -> None:
    dir_fd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    fh = os.open(tmp_path / "a", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    try:
        if change is not None:
            change(tmp_path)
        found = backing.reopen_named(dir_fd, b"a", fh)
        try:
            opened = os.fstat(fh)
            assert (found.st.st_dev, found.st.st_ino) == (opened.st_dev, opened.st_ino)
            st = os.fstat(found.fd)
            assert (st.st_dev, st.st_ino) == (opened.st_dev, opened.st_ino)
            assert _flags(found.fd) & os.O_PATH  # a handle, not an open file
        finally:
            os.close(found.fd)
    finally:
        os.close(fh)
        os.close(dir_fd)
