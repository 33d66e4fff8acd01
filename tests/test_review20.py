"""Review of the request loop's adaptive polling (scripts/pyfuse3-sessionpoll.patch,
credfs mount --poll): what the review found broken, each pinned by a test."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pyfuse3
import pytest
from helpers.mounts import CredfsMount


@pytest.fixture
def ascii_mount(backing: Path, mnt: Path, workdir: Path) -> Iterator[CredfsMount]:
    """A credfs whose locale encoding is ASCII (a C locale with UTF-8 mode and
    locale coercion off: what a minimal service environment can give), logging
    to a file (--log-file: the file takes the locale's encoding)."""
    env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    m = CredfsMount(backing, mnt, "--poll", "50", "--log-file", os.fspath(workdir / "file.log"),
                    env=env, log_path=workdir / "stderr.log")
    try:
        yield m.start()
    finally:
        m.stop()


@pytest.mark.skipif(not hasattr(pyfuse3, "poll_window_us"),
                    reason="stock pyfuse3: no polling, so no polling note in the start line")
def test_start_line_with_polling_reaches_an_ascii_log_file(ascii_mount: CredfsMount,
                                                           workdir: Path) -> None:
    # The polling note was the only non-ASCII text credfs writes ("µs"): the
    # start line, the one line an administrator reads, was lost from the log
    # file and a "--- Logging error ---" traceback went to stderr instead.
    os.stat(ascii_mount.mountpoint)
    file_log = workdir / "file.log"
    text = file_log.read_text(errors="replace") if file_log.exists() else ""
    assert "polls /dev/fuse up to 50 us before sleeping" in text, (text, ascii_mount.log)
    assert "Logging error" not in ascii_mount.log, ascii_mount.log
