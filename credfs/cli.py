"""Command line: `credfs mount` and `credfs umount`."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .cache import CacheMode
from .options import MountOptions, OptionError, parse_o, validate


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
    m.add_argument("--creds", choices=("caller", "mounter"), default="caller",
                   help="whose credentials backing operations run with (default: caller)")
    m.add_argument("--mounter", metavar="USER[:GROUP]",
                   help="with --creds mounter: record this identity instead of the invoker's "
                        "(root only)")
    m.add_argument("-o", dest="o", action="append", default=[], metavar="OPT[,OPT...]",
                   help="mount options: ro, rw, allow_other, noallow_other, "
                        "default_permissions, suid, dev, exec, noexec, noatime, fsname=, "
                        "subtype=, max_read=")
    m.add_argument("--workers", type=int, default=16, help="worker threads (default 16)")
    m.add_argument("--cache", choices=[c.value for c in CacheMode], default="auto",
                   help="attribute/entry authority: none, auto (default), always")
    m.add_argument("--missing-groups", choices=("deny", "nss"), default="deny",
                   help="when a caller's groups cannot be read from /proc: deny (default) or "
                        "take them from the group database")
    m.add_argument("--uid-map", metavar="MOUNT_ID:BACKING_ID:COUNT[,...]",
                   help="map uids seen through the mount to backing uids (as uid_map); "
                        "unmapped ids show as 65534 and cannot be used")
    m.add_argument("--gid-map", metavar="MOUNT_ID:BACKING_ID:COUNT[,...]",
                   help="the same for gids")
    m.add_argument("--foreground", "-f", action="store_true", help="do not daemonize")
    m.add_argument("--log-level", default="INFO",
                   choices=("DEBUG", "INFO", "WARNING", "ERROR"), type=str.upper)
    m.add_argument("--log-file", help="daemon log (default: stderr in the foreground, "
                                      "nowhere when daemonized)")
    u = sub.add_parser("umount", help="unmount a credfs mount (ends its daemon)")
    u.add_argument("mountpoint")
    return p


def _options(args: argparse.Namespace) -> MountOptions:
    opts = MountOptions(
        source=args.source, mountpoint=args.mountpoint, creds=args.creds,
        mounter=args.mounter, cache=CacheMode(args.cache), workers=args.workers,
        missing_groups=args.missing_groups, foreground=args.foreground,
        log_level=args.log_level, log_file=args.log_file, uid_map=args.uid_map,
        gid_map=args.gid_map)
    for spec in args.o:
        parse_o(opts, spec)
    validate(opts)
    return opts


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
    return _umount(args)
