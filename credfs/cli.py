"""Command line: `credfs mount`, `credfs umount`, `credfs check`, `credfs explain`."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys

from .cache import CacheMode
from .options import MountOptions, OptionError, parse_o, validate
from .policy import OPS, PolicyError, load_policy


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        sys.stderr.write(f"credfs: {message}\n")
        raise SystemExit(2)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="credfs", description="credential-aware FUSE passthrough filesystem")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    m = sub.add_parser("mount", help="mount SOURCE at MOUNTPOINT")
    m.add_argument("source")
    m.add_argument("mountpoint")
    m.add_argument("--creds", choices=("caller", "mounter"), default=None,
                   help="whose credentials backing operations run with (default: caller)")
    m.add_argument("--mounter", metavar="USER[:GROUP]",
                   help="with --creds mounter or --policy: record this identity instead of "
                        "the invoker's (root only)")
    m.add_argument("--caller-caps", action="store_true",
                   help="honour a caller's own capabilities (e.g. CAP_DAC_READ_SEARCH of a "
                        "backup tool, or root's) as natively; off by default")
    m.add_argument("--policy", metavar="FILE",
                   help="decide access and credentials per request by this policy "
                        "(see policies/); SIGHUP reloads it")
    m.add_argument("-o", dest="o", action="append", default=[], metavar="OPT[,OPT...]",
                   help="mount options: ro, rw, allow_other, noallow_other, "
                        "default_permissions, suid, dev, exec, noexec, noatime, fsname=, "
                        "subtype=, max_read=")
    m.add_argument("--workers", type=int, default=16, help="worker threads (default 16)")
    m.add_argument("--poll", type=int, default=50, metavar="USEC",
                   help="poll /dev/fuse for the next request up to USEC microseconds "
                        "before sleeping (adaptive; default 50; 0: never)")
    m.add_argument("--cache", choices=[c.value for c in CacheMode], default="auto",
                   help="attribute/entry authority: none, auto (default: changes made behind "
                        "the mount's back are watched and invalidate at once), always")
    m.add_argument("--passthrough", choices=("auto", "never"), default="auto",
                   help="kernel FUSE passthrough for reads and writes of open files: auto "
                        "(default: when the kernel, pyfuse3 and privileges allow it and the "
                        "backing filesystem is local) or never")
    m.add_argument("--missing-groups", choices=("deny", "nss"), default="deny",
                   help="when a caller's groups cannot be read from /proc: deny (default) or "
                        "take them from the group database")
    m.add_argument("--uid-map", metavar="MOUNT_ID:BACKING_ID:COUNT[,...]",
                   help="map uids seen through the mount to backing uids (as uid_map); "
                        "unmapped ids show as 65534 and cannot be used")
    m.add_argument("--gid-map", metavar="MOUNT_ID:BACKING_ID:COUNT[,...]",
                   help="the same for gids")
    m.add_argument("--inline", choices=("auto", "never"), default="auto",
                   help="metadata operations that cannot wait (lookup, mkdir, unlink, "
                        "chmod, ...) on the event loop instead of a worker: auto (default: "
                        "when the backing filesystem is local) or never")
    m.add_argument("--foreground", "-f", action="store_true", help="do not daemonize")
    m.add_argument("--log-level", default="INFO",
                   choices=("DEBUG", "INFO", "WARNING", "ERROR"), type=str.upper)
    m.add_argument("--log-file", help="daemon log (default: stderr in the foreground, "
                                      "nowhere when daemonized)")
    u = sub.add_parser("umount", help="unmount a credfs mount (ends its daemon)")
    u.add_argument("mountpoint")
    c = sub.add_parser("check", help="validate a policy file")
    c.add_argument("policy_file")
    e = sub.add_parser("explain", help="show the policy's decision for one request")
    e.add_argument("--policy", required=True, metavar="FILE")
    e.add_argument("--uid", required=True, type=_id_arg)
    e.add_argument("--gid", type=_id_arg, help="primary group (default: the user's, or UID)")
    e.add_argument("--groups", type=_ids_arg, metavar="G1,G2",
                   help="supplementary groups (default: the group database's, or GID)")
    e.add_argument("--mounter", metavar="USER[:GROUP]",
                   help="the identity the mount would record (default: the invoker)")
    e.add_argument("--op", required=True, choices=OPS)
    e.add_argument("path", help="path relative to the mount root")
    return p


def _id_arg(text: str) -> int:
    if not text.isdigit() or int(text) > 2**32 - 2:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a numeric id")
    return int(text)


def _ids_arg(text: str) -> tuple[int, ...]:
    return tuple(_id_arg(t.strip()) for t in text.split(",") if t.strip())


def _options(args: argparse.Namespace) -> MountOptions:
    if args.policy is not None and args.creds is not None:
        raise OptionError(f"--creds {args.creds}: with --policy the policy's rules say whose "
                          "credentials act")
    opts = MountOptions(
        source=args.source, mountpoint=args.mountpoint, creds=args.creds or "caller",
        mounter=args.mounter, cache=CacheMode(args.cache), workers=args.workers,
        poll_us=args.poll,
        passthrough=args.passthrough,
        missing_groups=args.missing_groups, foreground=args.foreground,
        log_level=args.log_level, log_file=args.log_file, policy=args.policy,
        uid_map=args.uid_map, gid_map=args.gid_map, caller_caps=args.caller_caps,
        inline=args.inline)
    for spec in args.o:
        parse_o(opts, spec)
    recovered = recover_dead_mount(opts.mountpoint)
    if recovered:
        sys.stderr.write(f"credfs: {recovered}\n")
    validate(opts)
    if opts.policy is not None:
        load_policy(opts.policy)  # refuse a bad policy before mounting anything
    return opts


def recover_dead_mount(mountpoint: str) -> str | None:
    """A FUSE mount whose daemon died answers ENOTCONN to everything: detach
    it, so that mounting there again brings the files back. What was done, or
    None when there was nothing to do."""
    try:
        os.stat(mountpoint)
        return None
    except OSError as exc:
        if exc.errno != errno.ENOTCONN:
            return None
    fstype = _fstype_at(mountpoint)
    if fstype is None or not fstype.startswith("fuse"):
        return None
    from .kernelmount import MountError, unmount
    try:
        unmount(mountpoint, via_fusermount=os.geteuid() != 0)
    except MountError as exc:
        raise OptionError(f"mountpoint {mountpoint}: a dead {fstype} mount (its daemon is "
                          f"gone: not connected) could not be removed: {exc.strerror}") from None
    return (f"mountpoint {mountpoint}: recovered a dead {fstype} mount (its daemon was gone; "
            "the mountpoint said 'Transport endpoint is not connected'): unmounted it")


def _setup_logging(opts: MountOptions) -> None:
    handlers: list[logging.Handler] = []
    if opts.log_file:
        handlers.append(logging.FileHandler(opts.log_file))
    elif opts.foreground:
        handlers.append(logging.StreamHandler(sys.stderr))
    else:
        handlers.append(logging.NullHandler())
    logging.basicConfig(level=opts.log_level, handlers=handlers, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _mount(args: argparse.Namespace) -> int:
    from .mount import serve  # heavy imports only when really mounting

    try:
        opts = _options(args)
    except OptionError as exc:
        sys.stderr.write(f"credfs: {exc}\n")
        return 2
    except PolicyError as exc:
        sys.stderr.write(f"credfs: refusing to mount with an invalid policy {args.policy}:\n")
        sys.stderr.write("".join(f"  {p}\n" for p in exc.problems))
        return 2
    if opts.foreground:
        _setup_logging(opts)
        try:
            return serve(opts, ready=lambda summary: None)
        except (OSError, ValueError) as exc:
            sys.stderr.write(f"credfs: {exc}\n")
            return 1
    return _daemonize(opts, serve)


def _daemonize(opts: MountOptions, serve: object) -> int:
    """Fork; the parent returns once the child reports the mount ready (or why not)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid:
        os.close(w)
        with os.fdopen(r, "rb") as pipe:
            msg = pipe.read().decode(errors="replace")
        if msg.startswith("ok "):
            sys.stderr.write(msg[3:].rstrip("\n") + "\n")
            return 0
        os.waitpid(pid, 0)
        sys.stderr.write(f"credfs: {msg.strip() or 'daemon exited before the mount was ready'}\n")
        return 1
    # child
    os.close(r)
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    _setup_logging(opts)
    reported = False

    def ready(summary: str | None) -> None:
        nonlocal reported
        os.write(w, f"ok {summary}\n".encode())
        os.close(w)
        reported = True
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)

    rc = 1
    try:
        rc = serve(opts, ready=ready)  # type: ignore[operator]
    except BaseException as exc:  # report anything, then exit
        if not reported:
            os.write(w, f"{exc}\n".encode())
        else:
            logging.getLogger("credfs").exception("daemon failed")
    finally:
        os._exit(rc)


def _fstype_at(path: str) -> str | None:
    """The type of the topmost mount at path, from /proc/self/mountinfo."""
    want = os.path.realpath(path)
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            mountpoint = left.split()[4].encode().decode("unicode_escape")
            if mountpoint == want:
                found = right.split()[0]
    return found


def _umount(args: argparse.Namespace) -> int:
    from .kernelmount import MountError, unmount

    mnt = args.mountpoint
    fstype = _fstype_at(mnt)
    if fstype is None:
        sys.stderr.write(f"credfs: {mnt}: not mounted\n")
        return 1
    if not fstype.startswith("fuse"):
        sys.stderr.write(f"credfs: {mnt}: not a credfs mount (it is {fstype})\n")
        return 1
    try:
        unmount(mnt, via_fusermount=os.geteuid() != 0)
    except MountError as exc:
        sys.stderr.write(f"credfs: umount {mnt}: {exc.strerror}\n")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "mount":
        return _mount(args)
    if args.command == "check":
        from .policy.report import check
        return check(args.policy_file, sys.stdout)
    if args.command == "explain":
        from .policy.report import explain
        return explain(args, sys.stdout)
    return _umount(args)
