"""Running the credfs command line from tests, bounded."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import pytest

CLI_TIMEOUT = 30.0


def run_cli(*args: str | os.PathLike[str], exe: list[str] | None = None,
            timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """Run the CLI to completion with a bounded wait, killing it by pid on timeout.

    Output goes to files, not pipes: a daemonized child that (wrongly) kept our
    pipes open would otherwise make this wait for the daemon, not the command.
    """
    argv = [*(exe or [sys.executable, "-m", "credfs"]), *map(os.fspath, args)]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                text=True, start_new_session=True)
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            err.seek(0)
            pytest.fail(f"{argv} did not finish in {timeout} s; stderr:\n{err.read()}")
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(argv, code, out.read(), err.read())
