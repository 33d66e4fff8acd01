"""The CLI's contract: failure paths, daemonizing, and the ways a mount ends.

Everything that touches the mount from this process goes through an agent (a
bounded wait), so a hung daemon fails a test instead of hanging the suite.
Every test leaves no mount and no daemon behind: the autouse fixture below kills
any `credfs ... mount ... MNT` process by pid and lazily unmounts MNT.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers.agents import Identity, UserAgent
from helpers.cli import CLI_TIMEOUT, run_cli
from helpers.mounts import CredfsMount, daemon_pids, is_mounted, kill_and_unmount, mounts_at

EXIT_TIMEOUT = 10.0
CREDFS_EXE = Path(sys.executable).parent / "credfs"  # the console script of this venv


@pytest.fixture(autouse=True)
def _no_leftovers(mnt: Path) -> Iterator[None]:
    yield
    kill_and_unmount(mnt)


def wait_for(cond: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def assert_one_line_error(r: subprocess.CompletedProcess[str], *must_name: str) -> None:
    assert r.returncode != 0, f"expected failure, got 0; stderr: {r.stderr!r}"
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected a one-line message on stderr, got: {r.stderr!r}"
    for name in must_name:
        assert name in lines[0], f"stderr should name {name}: {r.stderr!r}"


MODES = pytest.mark.parametrize("mode", [[], ["--foreground"]], ids=["daemon", "foreground"])


# --- bad input -------------------------------------------------------------------------


def test_mount_help_lists_options() -> None:
    r = run_cli("mount", "--help")
    assert r.returncode == 0, r.stderr
    for opt in ("--creds", "-o", "--workers", "--cache", "--foreground", "--log-level",
                "--missing-groups", "--poll"):
        assert opt in r.stdout, f"{opt} missing from mount --help"


@MODES
def test_missing_source(backing: Path, mnt: Path, mode: list[str]) -> None:
    missing = backing / "does-not-exist"
    r = run_cli("mount", missing, mnt, *mode)
    assert_one_line_error(r, str(missing))
    assert not is_mounted(mnt)
    assert not daemon_pids(mnt)


@MODES
def test_source_is_a_file(backing: Path, mnt: Path, mode: list[str]) -> None:
    f = backing / "file"
    f.write_text("x")
    r = run_cli("mount", f, mnt, *mode)
    assert_one_line_error(r, str(f))
    assert not is_mounted(mnt)
    assert not daemon_pids(mnt)


@MODES
def test_missing_mountpoint(backing: Path, mnt: Path, mode: list[str]) -> None:
    missing = mnt / "does-not-exist"
    r = run_cli("mount", backing, missing, *mode)
    assert_one_line_error(r, str(missing))
    assert not daemon_pids(missing)


@MODES
def test_mountpoint_not_empty(backing: Path, mnt: Path, mode: list[str]) -> None:
    (mnt / "already-here").write_text("x")
    r = run_cli("mount", backing, mnt, *mode)
    assert_one_line_error(r, str(mnt))
    assert not is_mounted(mnt)
    assert not daemon_pids(mnt)


@pytest.mark.parametrize("args", [
    ["--cache", "bogus"],
    ["--workers", "0"],
    ["--workers", "-1"],
    ["--workers", "many"],
    ["--creds", "bogus"],
    ["--missing-groups", "bogus"],
    ["--log-level", "loud"],
    ["--workers", "5000"],
    ["--poll", "-1"],
    ["--poll", "1001"],
    ["--poll", "soon"],
    ["--mounter", "no-such-user-xyz"],
    ["--mounter", "2001:no-such-group-xyz"],
    ["--mounter", "2001"],  # without --creds mounter or --policy
    ["-o", "bogus"],
    ["-o", "max_read=12"],
    ["-o", "subtype=a/b"],
    ["-o", "default_permissions"],  # caller mode
    ["--uid-map", "0:1000"],
    ["--uid-map", "0:1000:10,5:2000:10"],
    ["--gid-map", "x:y:z"],
    ["--policy", "/nonexistent/policy.toml"],
    ["--caller-caps", "--creds", "mounter"],
    ["--creds", "caller", "--policy", "/nonexistent/policy.toml"],
    ["--log-file", "/nonexistent/dir/credfs.log"],
], ids=lambda a: " ".join(a))
def test_bad_option(backing: Path, mnt: Path, args: list[str]) -> None:
    r = run_cli("mount", backing, mnt, "--foreground", *args)
    assert r.returncode != 0, f"{args} accepted; stderr: {r.stderr!r}"
    option = args[0].lstrip("-") if args[0] != "-o" else args[1].split("=")[0]
    assert option in r.stderr, f"stderr should name {option}: {r.stderr!r}"
    assert len(r.stderr.strip().splitlines()) <= 3, f"not a short message: {r.stderr!r}"
    assert "Traceback" not in r.stderr, r.stderr
    assert not is_mounted(mnt)


def test_umount_of_a_plain_directory_fails(mnt: Path) -> None:
    r = run_cli("umount", mnt)
    assert_one_line_error(r, str(mnt))


# --- lifecycle -------------------------------------------------------------------------


def test_daemonized_mount_returns_when_ready_and_umount_ends_it(
        backing: Path, mnt: Path, users: dict[str, Identity],
        make_agent: Callable[..., UserAgent]) -> None:
    (backing / "hello.txt").write_text("hello")
    assert CREDFS_EXE.exists(), f"console script {CREDFS_EXE} not installed"
    r = run_cli("mount", backing, mnt, exe=[str(CREDFS_EXE)])
    assert r.returncode == 0, r.stderr
    # No polling: the contract is that it returns only once the mount is ready.
    entries = mounts_at(mnt)
    assert entries, "credfs mount returned 0 but nothing is mounted yet"
    assert entries[-1].fstype == "fuse.credfs"
    pids = daemon_pids(mnt)
    assert pids, "no daemon process found for the mount"
    assert make_agent(users["root"]).do("read", str(mnt / "hello.txt")) == ("ok", b"hello")

    r = run_cli("umount", mnt, exe=[str(CREDFS_EXE)])
    assert r.returncode == 0, r.stderr
    assert wait_for(lambda: not is_mounted(mnt), EXIT_TIMEOUT), "still mounted after umount"
    assert wait_for(lambda: not any(alive(p) for p in pids), EXIT_TIMEOUT), \
        f"daemon {pids} still running after credfs umount"


def test_daemon_detaches_from_callers_stdio(backing: Path, mnt: Path) -> None:
    # `out=$(credfs mount ...)` in a shell must not wait for the daemon to exit.
    proc = subprocess.Popen([sys.executable, "-m", "credfs", "mount", backing, mnt],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    assert proc.stdout is not None and proc.stderr is not None
    try:
        try:
            code = proc.wait(CLI_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            pytest.fail("credfs mount did not return")
        assert code == 0
        open_fds = {proc.stdout.fileno(): "stdout", proc.stderr.fileno(): "stderr"}
        deadline = time.monotonic() + 5
        while open_fds and time.monotonic() < deadline:
            ready, _, _ = select.select(list(open_fds), [], [], 0.1)
            for fd in ready:
                if not os.read(fd, 65536):
                    del open_fds[fd]
        assert not open_fds, (f"the daemon keeps the caller's {sorted(open_fds.values())} open:"
                              " a shell capturing its output would hang")
    finally:
        proc.stdout.close()
        proc.stderr.close()


def test_mount_type_and_allow_other(mount_credfs: Callable[..., CredfsMount], backing: Path,
                                    mnt: Path, users: dict[str, Identity],
                                    make_agent: Callable[..., UserAgent]) -> None:
    (backing / "f").write_text("x")
    m = mount_credfs()
    assert m.entry is not None
    assert m.entry.fstype == "fuse.credfs"
    assert "allow_other" in m.entry.options.split(",")
    # Another user than the mounter can use the mount.
    carol = make_agent(users["carol"])
    assert carol.do("listdir", str(mnt)) == ("ok", ["f"])


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_signal_unmounts_and_exits_zero(mount_credfs: Callable[..., CredfsMount], mnt: Path,
                                        sig: signal.Signals) -> None:
    m = mount_credfs()
    m.signal(sig)
    code = m.wait(EXIT_TIMEOUT)
    assert code is not None, f"daemon still running {EXIT_TIMEOUT} s after {sig.name}"
    assert code == 0, f"exit code {code} after {sig.name}; log:\n{m.log}"
    assert not is_mounted(mnt), f"mount left behind after {sig.name}"
    assert "Traceback" not in m.log, m.log


def test_sigterm_unmounts_while_a_file_is_open(mount_credfs: Callable[..., CredfsMount],
                                               backing: Path, mnt: Path) -> None:
    (backing / "f").write_text("x")
    m = mount_credfs()
    # A busy mount must not keep the daemon (or the mount) alive after SIGTERM.
    # The open() on the mount is done by a separate, bounded process.
    holder = subprocess.Popen([sys.executable, "-c",
                               "import sys, time; f = open(sys.argv[1]); print('open', flush=True);"
                               " time.sleep(60)", str(mnt / "f")],
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None
        ready, _, _ = select.select([holder.stdout], [], [], CLI_TIMEOUT)
        assert ready and holder.stdout.readline() == "open\n", "could not open a file on the mount"
        m.signal(signal.SIGTERM)
        code = m.wait(EXIT_TIMEOUT)
        assert code is not None, "daemon still running after SIGTERM with a file open"
        assert code == 0, m.log
        assert not is_mounted(mnt)
    finally:
        holder.kill()
        holder.wait()
        if holder.stdout:
            holder.stdout.close()


@pytest.mark.parametrize("cmd", [["fusermount3", "-u"], ["umount"]], ids=lambda c: c[0])
def test_external_unmount_ends_daemon(mount_credfs: Callable[..., CredfsMount], mnt: Path,
                                      cmd: list[str]) -> None:
    m = mount_credfs()
    r = subprocess.run([*cmd, str(mnt)], capture_output=True, text=True, timeout=CLI_TIMEOUT,
                       stdin=subprocess.DEVNULL, check=False)
    assert r.returncode == 0, r.stderr
    code = m.wait(EXIT_TIMEOUT)
    assert code is not None, f"daemon still running {EXIT_TIMEOUT} s after {' '.join(cmd)}"
    assert not is_mounted(mnt)
    assert "Traceback" not in m.log, m.log
