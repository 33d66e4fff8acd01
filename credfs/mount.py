"""The daemon: set up, mount, serve under one trio nursery, unmount.

The trio nursery owns everything that runs: the pyfuse3 request loop, the
signal watchers (stop; SIGHUP reloads the policy), and (through start/stop
around it) the worker threads.
"""

from __future__ import annotations

import ctypes
import logging
import os
import resource
import signal
from collections.abc import Callable

import pyfuse3
import trio

from . import backing, kernelmount, notify, passthrough, privileges, syscalls
from .cache import CachePolicy
from .caller import CallerResolver
from .creds import Credentials
from .gate import PolicyGate
from .identity import CallerIdentity, IdentitySource, MounterIdentity, parse_mounter
from .inline import InlineRunner, local_type
from .inodes import InodeTable
from .notify import KernelNotifier
from .operations import Operations
from .options import MountOptions
from .passthrough import Passthrough
from .policy import load_policy
from .pressure import DescriptorPressure
from .watch import BackingWatch
from .watch import Target as WatchTarget
from .watch import apply as apply_invalidations
from .workers import WorkerPool

log = logging.getLogger(__name__)

Ready = Callable[[str | None], None]

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_M_ARENA_MAX = -8  # mallopt parameter (malloc.h)


def limit_malloc_arenas(arenas: int = 2) -> None:
    """glibc gives every thread that allocates an arena of its own (up to 8 per
    core); with a worker pool that is memory held in fragments, growing with
    load. Two arenas serve 2 cores' worth of threads as well."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_ARENA_MAX, arenas)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


def _nr_open() -> int:
    """The kernel's ceiling for RLIMIT_NOFILE (fs.nr_open)."""
    try:
        with open("/proc/sys/fs/nr_open") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 1 << 20  # the kernel's default


def raise_fd_limit() -> int:
    """Every inode the kernel knows costs the daemon one descriptor: take as many
    as allowed. A daemon with CAP_SYS_RESOURCE raises the hard limit itself, up
    to fs.nr_open (a login's default hard limit, often a few thousand, would make
    creating files fail with EMFILE once that many are cached); others raise
    their soft limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    ceiling = _nr_open()
    if hard < ceiling:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (ceiling, ceiling))
            return ceiling
        except (OSError, ValueError):
            pass  # not privileged: the hard limit is as far as it goes
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def record_mounter(opts: MountOptions) -> Credentials:
    """The mounter's credentials, taken once, now; they never change afterwards."""
    eff = syscalls.capget_thread()[0]
    if opts.mounter is None:
        return Credentials(os.geteuid(), os.getegid(),
                           tuple(sorted(set(os.getgroups()))), eff if os.geteuid() == 0 else 0)
    if os.geteuid() != 0:
        raise PermissionError("--mounter needs root")
    uid, gid, groups = parse_mounter(opts.mounter)
    # A service identity gets no capabilities: it is unprivileged by definition.
    return Credentials(uid, gid, groups, eff if uid == 0 else 0)


def privilege_mode(opts: MountOptions, mounter: Credentials | None) -> str:
    if mounter is None:
        return "caller"
    return "mounter" if mounter.caps else "mounter-unprivileged"


def build_identity(opts: MountOptions, mounter: Credentials | None
                   ) -> tuple[IdentitySource, PolicyGate | None]:
    """After privileges.restrict(): nobody is given more than the daemon kept.

    With a policy, the mount as a whole behaves as caller mode (the kernel
    checks nothing, nothing is cached that a rule decides per caller) and the
    gate picks the credentials per request."""
    permitted = syscalls.capget_thread()[1]
    resolver = CallerResolver(permitted, opts.missing_groups, opts.idmap)
    if mounter is not None:
        mounter = Credentials(mounter.uid, mounter.gid, mounter.groups,
                              mounter.caps & permitted)
    if opts.policy is not None:
        assert mounter is not None
        caller = CallerIdentity(resolver, opts.caller_caps)
        gate = PolicyGate(load_policy(opts.policy), caller, MounterIdentity(mounter, resolver))
        return caller, gate
    if mounter is None:
        return CallerIdentity(resolver, opts.caller_caps), None
    return MounterIdentity(mounter, resolver), None


def plan_passthrough(opts: MountOptions, is_root: bool, root_dev: int,
                     identity: IdentitySource, pool: WorkerPool, inline: InlineRunner | None
                     ) -> tuple[Passthrough | None, str]:
    """Whether open files may use kernel FUSE passthrough, and why (for the log)."""
    if opts.passthrough == "never":
        return None, "passthrough off (--passthrough never)"
    if not passthrough.binding_supports():
        return None, "passthrough unavailable (pyfuse3 without backing_id: " \
                     "see scripts/build-pyfuse3.sh)"
    if not is_root:
        return None, "passthrough unavailable (needs CAP_SYS_ADMIN)"
    fs = local_type(root_dev)
    if fs is None:
        return None, "passthrough off (backing filesystem not known to be local)"
    whose = f"the mounter, {identity.recorded.describe()}" \
        if isinstance(identity, MounterIdentity) else "the file's opener"
    return passthrough.Passthrough(pool, inline), \
        f"passthrough on ({fs}; reads and writes as {whose})"


def plan_watch(opts: MountOptions, cache: CachePolicy, root_fd: int, root_dev: int,
               mounter: Credentials | None) -> tuple[BackingWatch | None, str]:
    """Whether changes made behind the mount's back are watched (watch.py), and
    the cache's description for the log."""
    short = f"cache {cache.mode.value} (timeout {cache.timeout:g}s"
    if not cache.wants_watch:
        return None, short + ")"
    if privilege_mode(opts, mounter) == "mounter-unprivileged" and not opts.policy:
        return None, short + "; backing changes not watched: the daemon drops root)"
    if local_type(root_dev) is None:
        return None, short + "; backing changes not watched: not a local filesystem)"
    watch = BackingWatch.start(root_fd, root_dev)
    if isinstance(watch, str):
        return None, f"{short}; {watch})"
    return watch, (f"cache {cache.mode.value} (backing changes watched with fanotify; "
                   f"timeout {cache.watched_timeout:g}s)")


def poll_argument(poll_us: int) -> dict[str, int]:
    """pyfuse3.main's poll_us, where this pyfuse3 has it (scripts/build-pyfuse3.sh's
    has; a stock pyfuse3, used when that build was impossible, has not)."""
    return {"poll_us": poll_us} if hasattr(pyfuse3, "poll_window_us") else {}


def flush_is_noop(root_dev: int) -> bool:
    """Does a flush report nothing? A flush is close(dup(fd)) on the backing
    file: on a local filesystem that reports nothing, and credfs keeps no
    POSIX locks (the kernel keeps them itself). The kernel may then skip
    FUSE_FLUSH on close (FOPEN_NOFLUSH; see Operations). Dirty pages of a
    shared mapping are still written back when it is unmapped."""
    return local_type(root_dev) is not None


def serve(opts: MountOptions, ready: Ready) -> int:
    """Mount and serve until unmounted or signalled. Returns the exit status."""
    # From here on a stop signal must never kill us between mounting and
    # serving (that would leave a dead mount): remember it, act on it once the
    # trio signal receiver runs.
    early: list[int] = []
    for signum in _STOP_SIGNALS:
        signal.signal(signum, lambda s, _f: early.append(s))
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a reload before serving: nothing to do
    limit_malloc_arenas()  # before any worker thread exists
    fd_limit = raise_fd_limit()
    os.umask(0)  # the caller's umask is applied per request, never the daemon's
    mounter = record_mounter(opts) if opts.creds == "mounter" or opts.policy else None
    root_fd = os.open(opts.source, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    is_root = os.geteuid() == 0
    # A policy's rules may act as any caller: it keeps what caller mode keeps.
    kept = privileges.restrict(privilege_mode(opts, None if opts.policy else mounter))
    identity, gate = build_identity(opts, mounter)
    table = InodeTable(root_fd)
    pool = WorkerPool(opts.workers)
    cache = CachePolicy.for_mode(opts.cache)
    allow_other = opts.allow_other if opts.allow_other is not None else is_root
    if isinstance(identity, MounterIdentity):
        opts.default_permissions = True
    notifier = KernelNotifier(None)
    inline = InlineRunner() if opts.inline == "auto" else None
    if inline is not None:
        # Reading a caller's /proc entries may need the loop thread's own identity.
        identity.resolver.as_daemon = inline.own  # type: ignore[attr-defined]
    io_passthrough, passthrough_note = plan_passthrough(opts, is_root, table.root_dev,
                                                        identity, pool, inline)
    ops = Operations(table, pool, identity, cache, kernel_applies_umask=not is_root,
                     notifier=notifier, gate=gate, idmap=opts.idmap, inline=inline,
                     passthrough=io_passthrough,
                     flush_is_noop=flush_is_noop(table.root_dev),
                     callers=identity.resolver)  # type: ignore[attr-defined]
    ops.pressure = DescriptorPressure(max(fd_limit - 64, 0))
    watch, cache_note = plan_watch(opts, cache, root_fd, table.root_dev, mounter)
    if watch is not None:
        ops.watched_dev = table.root_dev

    summary = (f"credfs: serving {os.path.abspath(opts.source)} at "
               f"{os.path.abspath(opts.mountpoint)}; {ops.describe()}; {cache_note}; "
               f"{opts.workers} workers; "
               # ASCII "us": a log file takes the locale's encoding, maybe ASCII.
               + (f"polls /dev/fuse up to {opts.poll_us} us before sleeping; "
                  if opts.poll_us and poll_argument(opts.poll_us) else "")
               + f"up to ~{max(fd_limit - 64, 0)} inodes (RLIMIT_NOFILE {fd_limit}); "
               f"capabilities kept: {', '.join(kept) or 'none'}; {passthrough_note}"
               + ("; metadata inline" if inline and inline.covers(table.root_dev) else "")
               + ("; close sends no FLUSH (local backing)" if ops.noflush else "")
               + (f"; {opts.idmap.describe()}" if opts.idmap else ""))
    if is_root:
        fuse_fd = kernelmount.mount_fuse(opts, allow_other)
    try:
        if is_root:
            pyfuse3.init(ops, f"/dev/fd/{fuse_fd}", set())
        else:
            fuse_opts = {"fsname=" + (opts.fsname or os.path.abspath(opts.source)),
                         "subtype=" + opts.subtype, *opts.raw_o}
            if allow_other:
                fuse_opts.add("allow_other")
            if opts.default_permissions:
                fuse_opts.add("default_permissions")
            pyfuse3.init(ops, opts.mountpoint, fuse_opts)
        notifier.attach(notify.find_fuse_fd())
        if io_passthrough is not None:
            io_passthrough.dev_fd = notifier.fd
        backing.refuse_device(kernelmount.device_of_mount(opts.mountpoint))
        if is_root and privilege_mode(opts, mounter) == "mounter-unprivileged" \
                and not opts.policy:
            # Every backing operation is the service's: from here on the daemon
            # is the service, with only what unmounting needs.
            assert mounter is not None
            privileges.become(mounter.uid, mounter.gid, mounter.groups)
            summary += f"; dropped root: runs as uid {mounter.uid} with sys_admin only"
        log.info("%s", summary)
        trio.run(_main, ops, pool, opts, not is_root, ready, summary, early, watch)
    finally:
        if ops.callers is not None:
            log.info("callers: %d read from /proc, %d carried to the next request of "
                     "their syscall", ops.callers.read, ops.callers.carried)
        ops.as_daemon()  # unmounting needs the daemon's own capabilities
        if watch is not None:
            watch.close()
        pyfuse3.close(unmount=False)
        table.close_all()
        try:
            kernelmount.unmount(opts.mountpoint, via_fusermount=not is_root)
        except OSError as exc:
            log.warning("unmount at exit: %s", exc)
    return 0


async def _main(ops: Operations, pool: WorkerPool, opts: MountOptions, via_fusermount: bool,
                ready: Ready, summary: str, early_signals: list[int],
                watch: BackingWatch | None) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(_stop_on_signal, ops, opts.mountpoint, via_fusermount,
                            early_signals)
        await nursery.start(_reload_on_sighup, ops)
        if ops.inline is not None:
            nursery.start_soon(ops.inline.keep_tidy, ops.when_idle)
        if watch is not None:
            nursery.start_soon(watch.run, WatchTarget(ops), apply_invalidations)
        await _serve(ops, pool, opts, ready, summary)
        nursery.cancel_scope.cancel()


async def _serve(ops: Operations, pool: WorkerPool, opts: MountOptions, ready: Ready,
                 summary: str) -> None:
    pool.start()
    try:
        ready(summary)
        try:
            await pyfuse3.main(min_tasks=2, max_tasks=max(2 * opts.workers, 8),
                               **poll_argument(opts.poll_us))
        except* ConnectionAbortedError:
            # The kernel ended the connection with ECONNABORTED rather than
            # ENODEV (an abort when FUSE_ABORT_ERROR was negotiated; seen once
            # in the suite after a lazy unmount while busy). Nothing is left to
            # serve either way: exit as for an unmount, not with a traceback.
            log.info("FUSE connection aborted by the kernel, exiting")
        else:
            log.info("unmounted, exiting")
    finally:
        pool.stop()


async def _reload_on_sighup(ops: Operations,
                            task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                            ) -> None:
    gate = ops.gate
    with trio.open_signal_receiver(signal.SIGHUP) as signals:
        task_status.started()
        async for _ in signals:
            if gate is None:
                log.info("SIGHUP: no policy to reload")
                continue
            # Read and validated off the event loop; swapped in on it, so each
            # request sees one policy, old or new, never a mix.
            new = await ops.to_thread(gate.load_new)
            if new is not None:
                gate.install(new)
                ops.policy_changed()


async def _stop_on_signal(ops: Operations, mountpoint: str, via_fusermount: bool,
                          early_signals: list[int],
                          task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    with trio.open_signal_receiver(*_STOP_SIGNALS) as signals:
        task_status.started()
        signum = early_signals[0] if early_signals else await signals.__anext__()
    log.info("%s: unmounting", signal.Signals(signum).name)
    # Unmounting ends the request loop (the kernel closes the channel); lazily
    # if busy, so that a signal always ends the daemon.
    await ops.to_thread(kernelmount.unmount, mountpoint, via_fusermount)
    pyfuse3.terminate()
