"""Review of the loop thread's lent identity (inline.py): what it puts off
until the loop goes idle must not wait for ever on a mount that is never idle.

The oracle is the backing filesystem's own block count: a private tmpfs, so
that nothing but this test moves it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pyfuse3
import pytest
from helpers.agents import UserAgent
from helpers.mounts import CredfsMount

MountFactory = Callable[..., CredfsMount]

CHURN_SECONDS = 60.0  # the most the busy callers run, whatever happens
FREED_WITHIN = 15.0
SIZE = 16 << 20


@pytest.fixture
def tmpfs(workdir: Path) -> Iterator[Path]:
    """A private 64 MiB tmpfs (0755), unmounted at teardown."""
    p = workdir / "tmpfs"
    p.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m,mode=0755", "credfs-test", p],
                   check=True, timeout=30)
    try:
        yield p
    finally:
        subprocess.run(["umount", "-l", p], check=False, timeout=30)


def _free_blocks(path: Path) -> int:
    return os.statvfs(path).f_bfree


def _wait_freed(path: Path, baseline: int) -> int:
    deadline = time.monotonic() + FREED_WITHIN
    while (free := _free_blocks(path)) < baseline and time.monotonic() < deadline:
        time.sleep(0.05)
    return free


@pytest.mark.skipif(not hasattr(pyfuse3.FileInfo(), "backing_id"),
                    reason="pyfuse3 built without passthrough (scripts/build-pyfuse3.sh)")
def test_deleted_files_space_comes_back_while_others_keep_the_daemon_busy(
        tmpfs: Path, mnt: Path, workdir: Path, mount_credfs: MountFactory,
        agents: dict[str, UserAgent]) -> None:
    """bob writes, reads and deletes a 16 MiB file through the mount while
    alice and carol keep looking up names (inline requests, back to back).
    Natively its blocks are free once it is deleted and closed; through the
    mount they stay held by its passthrough backing id until the daemon closes
    it. That close was put off until the loop went idle (50 ms without an
    inline request), so as long as anyone kept the daemon busy - any local
    user with access to the mount - a deleted file's space never came back."""
    pub = tmpfs / "pub"
    pub.mkdir()
    pub.chmod(0o1777)
    bob = agents["bob"]
    # Natively first: the oracle for when the blocks are free again.
    baseline = _free_blocks(tmpfs)
    native_file = os.fspath(pub / "native")
    assert bob.do("write", native_file, b"x" * SIZE, os.O_WRONLY | os.O_CREAT) == ("ok", SIZE)
    assert _free_blocks(tmpfs) < baseline
    assert bob.do("unlink", native_file) == ("ok", None)
    assert _free_blocks(tmpfs) == baseline

    m = mount_credfs("--passthrough", "auto", source=tmpfs)
    line = m.start_line()
    assert "passthrough on" in line and "metadata inline" in line, line
    stop = workdir / "stop-churn"
    counts: list[int] = []

    def churn(who: str) -> None:
        counts.append(agents[who].call("lookup_fresh_until", os.fspath(mnt / "pub"),
                                       os.fspath(stop), CHURN_SECONDS,
                                       timeout=CHURN_SECONDS + 30))

    threads = [threading.Thread(target=churn, args=(who,)) for who in ("alice", "carol")]
    for t in threads:
        t.start()
    try:
        time.sleep(0.3)  # both are busy now
        path = os.fspath(mnt / "pub" / "big")
        assert bob.do("write", path, b"x" * SIZE, os.O_WRONLY | os.O_CREAT) == ("ok", SIZE)
        assert bob.do("read", path)[0] == "ok"
        assert _free_blocks(tmpfs) < baseline
        assert bob.do("unlink", path) == ("ok", None)
        free = _wait_freed(tmpfs, baseline)
        busy = all(t.is_alive() for t in threads)
    finally:
        stop.touch()
        for t in threads:
            t.join(timeout=CHURN_SECONDS + 60)
    assert len(counts) == 2 and min(counts) > 0, counts
    assert busy, "the busy callers stopped before the space was looked at"
    assert free == baseline, f"{(baseline - free) * os.statvfs(tmpfs).f_frsize} bytes still held"
    # Once the daemon is idle, the space is back in any case.
    assert _wait_freed(tmpfs, baseline) == baseline


# Run in a fresh interpreter: it switches its main thread's credentials (as
# the daemon's loop thread does), and trio's thread cache must hold no thread
# made before.
_FIRST_HELPER = r"""
import trio, trio.testing
from credfs import syscalls
from credfs.creds import Credentials
from credfs.inline import InlineRunner

async def main():
    inline = InlineRunner(types={})
    limiter = trio.to_thread.current_default_thread_limiter()
    limiter.total_tokens = 1
    await limiter.acquire()  # the helper waits at trio's checkpoint until released
    got = []
    async def helper():
        got.append(await inline.to_thread(syscalls.getfsuid))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(helper)
        await trio.testing.wait_all_tasks_blocked()
        # Meanwhile the first inline operation ever: the loop is lent to alice.
        inline.run(Credentials(2001, 2001, (2001, 3001), 0), 0, lambda: None)
        limiter.release()
    inline.own()
    print(got[0], syscalls.getfsuid())

trio.run(main)
"""


def test_first_helper_thread_is_the_daemons_even_if_the_loop_was_lent_meanwhile() -> None:
    """A helper thread started through InlineRunner.to_thread runs its job as
    the daemon, also when the loop thread had never been lent when to_thread
    was called but was lent by the time trio started the thread (trio
    checkpoints in between, and other requests run there). The thread then
    inherited the caller's identity and kept it for that job: an unmount at
    SIGTERM or a policy reload ran as that caller."""
    out = subprocess.run([sys.executable, "-c", _FIRST_HELPER], capture_output=True,
                         text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    helper_fsuid, loop_fsuid = map(int, out.stdout.split())
    assert loop_fsuid == os.getuid() == 0
    assert helper_fsuid == 0, f"the helper thread ran as fsuid {helper_fsuid}"
