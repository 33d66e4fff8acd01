"""The worker pool: threads that act on the backing store as someone.

Each job names the credentials it must run with; the worker switches to them
(and verifies the switch) before it calls the job, every time, so no job can
run with a previous job's identity. Workers are plain threads owned by the
pool; the pool is started and stopped by the mount's trio nursery.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import outcome
import prctl
import trio

from .creds import CredentialError, Credentials, ThreadIdentity

log = logging.getLogger(__name__)

T = TypeVar("T")

_STOP = object()


class WorkerPool:
    def __init__(self, size: int) -> None:
        self.size = size
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._token: trio.lowlevel.TrioToken | None = None
        self._started = threading.Barrier(size + 1)
        self._start_errors: list[BaseException] = []

    def start(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        for i in range(self.size):
            t = threading.Thread(target=self._work, name=f"credfs-worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        self._started.wait(timeout=30)
        if self._start_errors:
            self.stop()
            raise RuntimeError(f"worker could not start: {self._start_errors[0]}")

    def stop(self) -> None:
        for _ in self._threads:
            self._jobs.put(_STOP)
        for t in self._threads:
            t.join(timeout=30)
        self._threads.clear()

    async def run(self, creds: Credentials, umask: int, fn: Callable[..., T], *args: Any) -> T:
        """Run fn(*args) in a worker switched to creds; re-raise what it raises."""
        task = trio.lowlevel.current_task()
        token = self._token
        assert token is not None

        def deliver(result: outcome.Outcome[T]) -> None:
            token.run_sync_soon(trio.lowlevel.reschedule, task, result)

        self._jobs.put((creds, umask, fn, args, deliver))
        # A backing syscall cannot be abandoned half way: wait for its outcome
        # even if the surrounding scope is cancelled.
        return await trio.lowlevel.wait_task_rescheduled(  # type: ignore[no-any-return]
            lambda _: trio.lowlevel.Abort.FAILED)

    def submit(self, creds: Credentials, umask: int, fn: Callable[..., T], *args: Any,
               done: Callable[[outcome.Outcome[T]], None]) -> None:
        """Run fn(*args) in a worker switched to creds without waiting for it:
        done(its outcome) runs on the event loop afterwards."""
        self._jobs.put((creds, umask, fn, args, self.on_loop(done)))

    def on_loop(self, fn: Callable[..., None]) -> Callable[..., None]:
        """fn, to be called from a worker: it then runs on the event loop (not
        at all once the loop has ended, as when the daemon stops)."""
        token = self._token
        assert token is not None

        def soon(*args: Any) -> None:
            try:
                token.run_sync_soon(fn, *args)
            except trio.RunFinishedError:
                pass

        return soon

    def _work(self) -> None:
        try:
            identity = ThreadIdentity()
        except BaseException as exc:
            self._start_errors.append(exc)
            self._started.wait(timeout=30)
            return
        # The thread's name in /proc (ps -L, top -H), once it holds no
        # capability: until then it still has what it inherited.
        prctl.set_name("credfs-worker")
        self._started.wait(timeout=30)
        while True:
            job = self._jobs.get()
            if job is _STOP:
                return
            creds, umask, fn, args, deliver = job
            try:
                identity.become(creds, umask)
            except CredentialError as exc:
                log.warning("refusing request: %s", exc)
                deliver(outcome.Error(exc))
                continue
            deliver(outcome.capture(fn, *args))
