"""The request loop's adaptive polling (scripts/pyfuse3-sessionpoll.patch;
credfs mount --poll).

After answering a request, the loop polls the FUSE fd for the next one for a
window before it sleeps on the fd; the window adapts as the kernel's
cpuidle-haltpoll does. Here a trivial pyfuse3 filesystem (helpers/pollfs.py)
reports the window: request-and-answer traffic must open it, single requests
far apart must close it again (polling after each would be CPU spent for
nothing), and poll_us=0 must never open it. The window is read through a
getxattr, itself one request.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pyfuse3
import pytest
from helpers import pollfs
from helpers.helperfs import HelperFs

pytestmark = pytest.mark.skipif(
    not hasattr(pyfuse3, "poll_window_us"),
    reason="stock pyfuse3: main() has no poll_us (scripts/pyfuse3-sessionpoll.patch not built)")

# Far above any gap between a reply and the next request of a process that
# stats in a loop, however loaded the machine: the window must open.
POLL_US = 5000


@pytest.fixture
def serve_pollfs(tmp_path: Path, helper_fs: Callable[..., HelperFs]) -> Callable[[int], Path]:
    def start(poll_us: int) -> Path:
        mnt = tmp_path / f"pollfs-{poll_us}"
        mnt.mkdir()
        helper_fs(pollfs.__file__, mnt, str(poll_us))
        return mnt
    return start


def window_us(mnt: Path) -> int:
    return int(os.getxattr(mnt, pollfs.WINDOW_XATTR))


def stat_loop(mnt: Path, rounds: int = 300) -> None:
    paths = [mnt / f"f{i}" for i in range(pollfs.FILES)]
    for _ in range(rounds):
        for p in paths:
            os.stat(p)  # a LOOKUP and a GETATTR, each answered before the next


def test_window_opens_under_traffic_and_closes_when_requests_come_apart(
        serve_pollfs: Callable[[int], Path]) -> None:
    mnt = serve_pollfs(POLL_US)
    stat_loop(mnt)
    opened = window_us(mnt)
    assert 0 < opened <= POLL_US
    # One request at a time, each after a quiet longer than the largest
    # window: each halves the window, and below 10 µs it is 0.
    for _ in range(16):
        time.sleep(0.05)
        last = window_us(mnt)
    assert last == 0, f"window still {last} µs after requests 50 ms apart (was {opened})"
    stat_loop(mnt)
    assert window_us(mnt) > 0, "the window did not open again"


def test_poll_0_never_polls(serve_pollfs: Callable[[int], Path]) -> None:
    mnt = serve_pollfs(0)
    stat_loop(mnt)
    assert window_us(mnt) == 0
