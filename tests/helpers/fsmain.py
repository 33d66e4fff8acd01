"""The serving loop of the helper filesystems (tests/helpers/*fs.py), each run
as a script by helperfs.start_helper_fs: mount, print "ready" once signals
are received, serve until SIGTERM or SIGINT, unmount."""

from __future__ import annotations

import signal
import stat
from collections.abc import Callable
from typing import Any

import pyfuse3
import trio

_ENDING = (signal.SIGTERM, signal.SIGINT)


def root_attrs(mode: int = 0o755) -> pyfuse3.EntryAttributes:
    """The attributes of a helper filesystem's root directory (never cached)."""
    a = pyfuse3.EntryAttributes()
    a.st_ino = pyfuse3.ROOT_INODE
    a.attr_timeout = 0
    a.st_mode, a.st_nlink = stat.S_IFDIR | mode, 2
    return a


def serve(ops: pyfuse3.Operations, mountpoint: str, options: list[str],
          signals: tuple[int, ...] = (),
          on_signal: Callable[[int, bool], None] | None = None, **main_args: Any) -> None:
    """Serve ops at mountpoint. on_signal(signum, ending) runs for each of
    signals, and for SIGTERM/SIGINT (ending: True) before the loop ends.
    main_args go to pyfuse3.main (default 2 to 8 tasks)."""
    pyfuse3.init(ops, mountpoint, options)
    try:
        trio.run(_serve, signals, on_signal, {"min_tasks": 2, "max_tasks": 8, **main_args})
    finally:
        pyfuse3.close(unmount=True)


async def _serve(signals: tuple[int, ...], on_signal: Callable[[int, bool], None] | None,
                 main_args: dict[str, Any]) -> None:
    async with trio.open_nursery() as nursery:
        async def receive(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                          ) -> None:
            with trio.open_signal_receiver(*signals, *_ENDING) as received:
                task_status.started()
                async for signum in received:
                    ending = signum in _ENDING
                    if on_signal is not None:
                        on_signal(signum, ending)
                    if ending:
                        pyfuse3.terminate()
                        return

        # "ready" only once signals are received: a signal sent on "ready"
        # would otherwise end the process.
        await nursery.start(receive)
        print("ready", flush=True)
        await pyfuse3.main(**main_args)
        nursery.cancel_scope.cancel()
