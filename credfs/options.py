"""Mount options: parsed and validated before anything is mounted."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .cache import CacheMode
from .idmap import IdMapError, IdMapping

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_SYNCHRONOUS = 16
MS_DIRSYNC = 128
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_POSIXACL = 1 << 16
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24

# option -> (flags to set, flags to clear)
_FLAG_OPTIONS: dict[str, tuple[int, int]] = {
    "ro": (MS_RDONLY, 0), "rw": (0, MS_RDONLY),
    "nosuid": (MS_NOSUID, 0), "suid": (0, MS_NOSUID),
    "nodev": (MS_NODEV, 0), "dev": (0, MS_NODEV),
    "noexec": (MS_NOEXEC, 0), "exec": (0, MS_NOEXEC),
    "sync": (MS_SYNCHRONOUS, 0), "async": (0, MS_SYNCHRONOUS),
    "dirsync": (MS_DIRSYNC, 0),
    "noatime": (MS_NOATIME, 0), "atime": (0, MS_NOATIME),
    "nodiratime": (MS_NODIRATIME, 0), "diratime": (0, MS_NODIRATIME),
    "relatime": (MS_RELATIME, 0), "strictatime": (MS_STRICTATIME, 0),
}
_FUSE_FLAGS = {"allow_other", "default_permissions", "noallow_other"}
_FUSE_VALUES = {"max_read", "fsname", "subtype"}


MAX_POLL_US = 1000


class OptionError(ValueError):
    """A bad option: the message says which and why."""


@dataclass
class MountOptions:
    source: str
    mountpoint: str
    creds: str = "caller"
    mounter: str | None = None
    cache: CacheMode = CacheMode.AUTO
    workers: int = 16
    poll_us: int = 50  # the most the request loop polls /dev/fuse before sleeping
    passthrough: str = "auto"  # auto | never
    missing_groups: str = "deny"
    foreground: bool = False
    log_level: str = "INFO"
    log_file: str | None = None
    ms_flags: int = MS_NOSUID | MS_NODEV
    allow_other: bool | None = None  # None: on when run as root
    default_permissions: bool = False
    max_read: int | None = None
    fsname: str | None = None
    subtype: str = "credfs"
    raw_o: list[str] = field(default_factory=list)
    policy: str | None = None  # path of the policy file
    caller_caps: bool = False  # honour callers' own capabilities (caller mode, policies)
    uid_map: str | None = None  # --uid-map / --gid-map as given; parsed into idmap
    gid_map: str | None = None
    idmap: IdMapping | None = None
    inline: str = "auto"  # metadata on the event loop: auto (local backing) | never

    @property
    def read_only(self) -> bool:
        return bool(self.ms_flags & MS_RDONLY)


def parse_o(opts: MountOptions, spec: str) -> None:
    """Apply one -o argument (comma-separated) to opts."""
    for item in filter(None, (s.strip() for s in spec.split(","))):
        key, eq, value = item.partition("=")
        if key in _FLAG_OPTIONS and not eq:
            set_, clear = _FLAG_OPTIONS[key]
            opts.ms_flags = (opts.ms_flags & ~clear) | set_
        elif key in _FUSE_FLAGS and not eq:
            if key == "allow_other":
                opts.allow_other = True
            elif key == "noallow_other":
                opts.allow_other = False
            else:
                opts.default_permissions = True
        elif key in _FUSE_VALUES and eq and value:
            if key == "max_read":
                if not value.isdigit() or int(value) < 4096:
                    raise OptionError(f"-o max_read={value}: expected a number >= 4096")
                opts.max_read = int(value)
            elif key == "fsname":
                opts.fsname = value
            else:
                if not value.replace("_", "").replace("-", "").isalnum():
                    raise OptionError(f"-o subtype={value}: letters, digits, - and _ only")
                opts.subtype = value
        else:
            raise OptionError(f"-o {item}: unknown mount option")
        opts.raw_o.append(item)


def validate(opts: MountOptions) -> None:
    """Check everything that can be checked before mounting."""
    if opts.workers < 1 or opts.workers > 1024:
        raise OptionError(f"--workers {opts.workers}: must be between 1 and 1024")
    if not 0 <= opts.poll_us <= MAX_POLL_US:
        raise OptionError(f"--poll {opts.poll_us}: must be between 0 (never) and "
                          f"{MAX_POLL_US} microseconds")
    if opts.creds not in ("caller", "mounter"):
        raise OptionError(f"--creds {opts.creds}: must be caller or mounter")
    if opts.mounter is not None and opts.creds != "mounter" and opts.policy is None:
        raise OptionError("--mounter only makes sense with --creds mounter or --policy")
    if opts.caller_caps and opts.creds == "mounter":
        raise OptionError("--caller-caps: in mounter mode the mounter's credentials act; "
                          "callers' capabilities only count in caller mode and policies")
    if opts.policy is not None and opts.default_permissions:
        raise OptionError("-o default_permissions: with --policy the policy and the "
                          "credentials its rules act with decide every permission")
    if opts.inline not in ("auto", "never"):
        raise OptionError(f"--inline {opts.inline}: must be auto or never")
    if opts.missing_groups not in ("deny", "nss"):
        raise OptionError(f"--missing-groups {opts.missing_groups}: must be deny or nss")
    try:
        opts.idmap = IdMapping.parse(opts.uid_map, opts.gid_map)
    except IdMapError as exc:
        raise OptionError(str(exc)) from None
    if opts.creds == "caller" and opts.default_permissions:
        raise OptionError("-o default_permissions: caller mode lets the backing filesystem "
                          "decide every permission; use --creds mounter for kernel checks")
    if opts.log_file is not None:
        try:
            with open(opts.log_file, "a"):
                pass
        except OSError as exc:
            raise OptionError(f"--log-file {opts.log_file}: {exc.strerror}") from None
    src = opts.source
    if not os.path.lexists(src):
        raise OptionError(f"source {src}: does not exist")
    if not os.path.isdir(src):
        raise OptionError(f"source {src}: not a directory")
    mnt = opts.mountpoint
    if not os.path.lexists(mnt):
        raise OptionError(f"mountpoint {mnt}: does not exist")
    if not os.path.isdir(mnt):
        raise OptionError(f"mountpoint {mnt}: not a directory")
    if os.path.ismount(mnt):
        raise OptionError(f"mountpoint {mnt}: busy (something is already mounted there)")
    try:
        if os.listdir(mnt):
            raise OptionError(f"mountpoint {mnt}: not empty")
    except PermissionError:
        raise OptionError(f"mountpoint {mnt}: permission denied") from None
    if os.path.realpath(mnt) == os.path.realpath(src) or \
            os.path.realpath(mnt).startswith(os.path.realpath(src).rstrip("/") + "/"):
        # A mount inside its own source would let the daemon recurse into itself.
        raise OptionError(f"mountpoint {mnt}: must not be inside the source {src}")
