"""pyfuse3 handlers: a translation layer and nothing more.

Each handler asks who is asking and what the policy says (the gate: the
credential mode alone when there is no policy), hands one backing function to
the worker pool with the resulting credentials, and turns the outcome into a
reply or a FUSEError. No permission logic lives here; the backing filesystem
decides, as the identity the worker holds.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import inspect
import logging
import os
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import outcome
import pyfuse3
import trio
from pyfuse3 import FUSEError

from . import acl, backing, caller, filters, listing, passes, syscalls
from .cache import CachePolicy, NameCache
from .caller import CallerResolver
from .continuation import Continuations, mknod_is_exclusive
from .creds import (
    CAP_DAC_READ_SEARCH,
    CAP_SETFCAP,
    CAP_SYS_ADMIN,
    CredentialError,
    Credentials,
    cap_bit,
)
from .gate import Act, NeedsObject, PolicyGate, refuse_unknown_caller
from .identity import IdentitySource
from .idmap import IdMapping
from .inline import InlineRunner, local_type
from .inodes import Inode, InodeTable
from .notify import KernelNotifier
from .passthrough import Choice, Io, Passthrough, binding_supports, kills_setid, registration_for
from .policy import Decision, ObjectFacts
from .pressure import DescriptorPressure
from .workers import WorkerPool

log = logging.getLogger(__name__)

T = TypeVar("T")

# pyfuse3 turns "set to now" into an explicit timestamp it reads from the clock
# immediately before calling setattr (no await in between). A request whose two
# times are that same nanosecond-precise reading, within this of our own clock,
# is taken as utimensat(NULL) ("touch"), which writers may do, not only owners.
_NOW_WINDOW_NS = 50_000_000


def _is_touch(attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields) -> bool:
    if not (fields.update_atime and fields.update_mtime):
        return False
    t = attr.st_atime_ns
    return (t == attr.st_mtime_ns and t % 1_000_000_000 != 0
            and 0 <= time.time_ns() - t < _NOW_WINDOW_NS)

# Read-only xattr on the mount root: the credential mode and, in mounter mode,
# the credentials recorded at mount time. Not listed, so copies don't take it.
CREDS_XATTR = b"user.credfs.creds"

_DOTS = 2  # "." and ".." lead every listing

_ACL_NAMES = (b"system.posix_acl_access", b"system.posix_acl_default")
# Extended attributes credfs keeps for itself on the backing store.
_RESERVED_XATTR_PREFIX = b"trusted.credfs."

# Looks at files for a policy's type and owner conditions, and records owners:
# trusted.* needs CAP_SYS_ADMIN; search on the way, CAP_DAC_READ_SEARCH. What
# it sees only feeds decisions.
_PROBE = Credentials(0, 0, (0,), cap_bit(CAP_SYS_ADMIN) | cap_bit(CAP_DAC_READ_SEARCH))
# Entries below a directory a policy mount checks before moving it (see rename).
_MOVE_CHECK_LIMIT = 10_000


def _guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A bug in one handler fails that request with EIO; the daemon keeps serving."""
    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await fn(*args, **kwargs)
        except FUSEError:
            raise
        except Exception:
            log.exception("internal error in %s", fn.__name__)
            raise FUSEError(errno.EIO) from None
    return wrapper


@dataclass(slots=True)
class Handle:
    fd: int
    creds: Credentials  # the opener's: every later operation on it runs as them
    kill_privs: bool = False  # writes must clear setuid/setgid (see IdentitySource)
    entries: listing.Snapshot | None = None
    listed: passes.Pass | None = None  # readdir without a policy: the pass entries come from
    node: int = 0
    io: Io = Io.CACHED  # how the kernel does this open file's reads and writes
    filters: tuple[str, ...] = ()  # data filters decided at open, applied to every read
    # readdir: the opener's lookup decision for a name (needs_object: give the file)
    decide: Callable[[str, bytes, ObjectFacts | None], Decision] | None = None
    owners: dict[bytes, int | None] | None = None  # readdir: recorded owners of entries
    listed_views: dict[bytes, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    listed_refused: set[bytes] = dataclasses.field(default_factory=set)  # listed, lookup denied


_CACHED = Choice(Io.CACHED)
_CAPS_XATTR = b"security.capability"
# Filesystems whose xattr handlers check nothing of the reader (see
# Operations._caps_read_by_anyone).
_PLAIN_XATTR_TYPES = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "f2fs"})
# Removes file capabilities for the kernel's kill (see _kill_caps_for_writer).
_CAPS_KILLER = Credentials(0, 0, (), cap_bit(CAP_SETFCAP))


class Operations(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False
    enable_passthrough = False
    # Setuid/setgid bits and file capabilities are cleared by the backing
    # filesystem itself, because every write, truncate and chown runs there as
    # the caller, or is followed by an explicit kill where the acting
    # credentials are not the caller's (IdentitySource.kills_privileges). So
    # the kernel need not ask for security.capability, nor send a chmod, before
    # every write (FUSE_HANDLE_KILLPRIV_V2; with a pyfuse3 built by
    # scripts/build-pyfuse3.sh, otherwise see _kill_setid_for_writer).
    enable_killpriv_v2 = True
    # Plain readdir wherever readdirplus would not pay (see listing.py).
    enable_readdirplus_auto = listing.SUPPORTED
    # write() gets the caller's file flags as they are at each write (a
    # pyfuse3 built by scripts/build-pyfuse3.sh): O_APPEND set or cleared by
    # fcntl(F_SETFL) after the open counts, as natively (see _append_per_write).
    enable_write_flags = bool(getattr(pyfuse3, "WRITE_FLAGS", False))
    # Lookups and listings in one directory reach the daemon side by side
    # (FUSE_PARALLEL_DIROPS; scripts/pyfuse3-dirops.patch). Without it the
    # kernel holds a mutex of the directory around each, so that one slow
    # lookup or one lister's pass holds up every other caller there.
    enable_parallel_dirops = True

    def __init__(self, table: InodeTable, pool: WorkerPool, identity: IdentitySource,
                 cache: CachePolicy, kernel_applies_umask: bool,
                 notifier: KernelNotifier, gate: PolicyGate | None = None,
                 idmap: IdMapping | None = None, inline: InlineRunner | None = None,
                 passthrough: Passthrough | None = None, flush_is_noop: bool = False,
                 callers: CallerResolver | None = None) -> None:
        super().__init__()
        # Who is asking, kept for the next request of the same syscall.
        self.callers = callers
        self.continuations = Continuations()
        self.inline = inline  # None: every backing operation goes to a worker
        self.passthrough = passthrough
        # flush_is_noop: a flush of a backing file reports nothing (mount.py's
        # flush_is_noop). Then the kernel is asked not to send FLUSH at all,
        # where pyfuse3 can say so (noflush), and a FLUSH that comes anyway is
        # answered at once.
        self.flush_is_noop = flush_is_noop
        self.noflush = flush_is_noop and binding_supports()
        self.enable_passthrough = passthrough is not None
        self.idmap = idmap  # None: ids pass unchanged (no cost per request)
        self.table = table
        self.pool = pool
        self.identity = identity
        self.cache = cache
        # The backing device whose changes watch.py reports (long timeouts on it).
        self.watched_dev: int | None = None
        # Asks the kernel to forget old entries before descriptors run out.
        self.pressure: DescriptorPressure | None = None
        self.names = NameCache(cache, notifier)
        self.kernel_applies_umask = kernel_applies_umask
        self.enable_acl = identity.kernel_checks_permissions
        self.gate = gate
        self._handles: dict[int, Handle] = {}
        self.passes = passes.Passes()  # directory passes later openers may take
        self._caps_plain: dict[int, bool] = {}  # per backing device: see _caps_read_by_anyone
        self._next_fh = 1

    # -- plumbing -------------------------------------------------------------

    def _act(self, ctx: pyfuse3.RequestContext, op: str, node: Inode,
             name: bytes | None = None, obj: ObjectFacts | None = None) -> Act:
        """Who does op on node (or on name in it) for ctx's caller; FUSEError
        when the policy refuses it or the caller cannot be identified.

        obj: the file the request is about, when it is not node itself (a new
        name: what it will be). Raises NeedsObject when a rule asks about an
        existing name's file: see _act_named."""
        if self.gate is not None:
            if obj is None and name is None:
                obj = ObjectFacts(node.is_dir, node.owner_uid)
            return self.gate.act(ctx, op, self.table.path(node, name), obj)
        try:
            return Act(self.identity.backing_creds(ctx), self.identity)
        except CredentialError as exc:
            raise refuse_unknown_caller(ctx, exc) from None
        except OSError as exc:  # out of descriptors or memory ourselves
            raise FUSEError(exc.errno or errno.EIO) from None

    async def _act_named(self, ctx: pyfuse3.RequestContext, op: str, parent: Inode,
                         name: bytes) -> Act:
        """_act for an existing name in parent, looking at its file when a
        policy rule asks (a name that is not there: ENOENT)."""
        try:
            return self._act(ctx, op, parent, name)
        except NeedsObject as need:
            (found,) = await self._run(_PROBE, backing.probe, parent.fd, [name],
                                       local=parent)
            if found is None:
                raise FUSEError(errno.ENOENT) from None
            return need.request.act(need.op, need.path, ObjectFacts(*found))

    def _records_owners(self) -> bool:
        return self.gate is not None and self.gate.policy.records_owners

    def _act_all(self, ctx: pyfuse3.RequestContext, ops: Sequence[str], node: Inode) -> Act:
        """One request that is several operations: each must be allowed; the
        first one's credentials act."""
        if self.gate is None:
            return self._act(ctx, ops[0], node)  # no policy: one answer for all ops
        request = self.gate.begin(ctx)
        path, obj = self.table.path(node), ObjectFacts(node.is_dir, node.owner_uid)
        acts = [request.act(op, path, obj) for op in ops]  # each raises when refused
        return acts[0]

    def _shared(self, node: Inode, name: bytes, st: os.stat_result) -> bool:
        """Would every caller get the same policy decision looking up name?"""
        if self.gate is None:
            return True
        if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
            # Node operations are decided by the path the file was last looked
            # up by: a file with several names must be looked up afresh by name.
            return False
        return self.gate.policy.lookup_uniform(self.table.path(node, name))

    def policy_changed(self) -> None:
        """A new policy is in force: names the kernel cached under the old one
        must be asked about again."""
        self.names.drop_everywhere(self.table.directories_with_cached_names())

    async def _run(self, creds: Credentials, fn: Callable[..., T], *args: Any,
                   umask: int = 0, local: Inode | None = None) -> T:
        """fn(*args) as creds. local: fn cannot wait on another process (see
        inline.py) and works on local's device: on the event loop when that is
        a local filesystem, skipping the hop to a worker."""
        try:
            if local is not None and self.inline is not None \
                    and self.inline.covers(local.key[0]):
                try:
                    return self.inline.run(creds, umask, fn, *args)
                except backing.Elsewhere:
                    pass  # a name led onto another device: a worker does it
            return await self.pool.run(creds, umask, fn, *args)
        except OSError as exc:
            raise FUSEError(exc.errno or errno.EIO) from None
        except CredentialError:
            raise FUSEError(errno.EACCES) from None

    async def _close(self, h: Handle) -> None:
        """Close h's backing descriptor: on the loop as whoever it is, on a
        local filesystem (InlineRunner.close); elsewhere in a worker as the
        opener (a close may flush to a server)."""
        node = self.table.known(h.node)
        if node is not None and self._covers(node):
            assert self.inline is not None
            try:
                self.inline.close(h.fd)
            except OSError as exc:
                raise FUSEError(exc.errno or errno.EIO) from None
            return
        await self._run(h.creds, backing.close, h.fd)

    def _covers(self, node: Inode) -> bool:
        """Do operations on node's device run inline (see _run)?"""
        return self.inline is not None and self.inline.covers(node.key[0])

    def as_daemon(self) -> None:
        """The loop thread's own identity back now (see inline.py), for what
        must run on it as the daemon."""
        if self.inline is not None:
            self.inline.own()

    async def to_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) in a trio helper thread, as the daemon (see inline.py)."""
        if self.inline is not None:
            return await self.inline.to_thread(fn, *args)
        return await trio.to_thread.run_sync(fn, *args)

    def when_idle(self) -> None:
        """The loop went idle (InlineRunner.keep_tidy): work put off till then."""
        if self.passthrough is not None:
            self.passthrough.close_unregistered()
        caller.close_status_files()

    def describe(self) -> str:
        if self.gate is None:
            return self.identity.describe()
        p = self.gate.policy
        return f"policy {p.source} ({len(p.rules)} rules); rules acting as the " \
               f"{self.gate.mounter.describe()}"

    def _umask(self, ctx: pyfuse3.RequestContext) -> int:
        # When the kernel already applied the caller's umask to the mode, ours is 0;
        # otherwise the worker takes the caller's, so that a default ACL on the
        # parent replaces it exactly as it does natively.
        return 0 if self.kernel_applies_umask else ctx.umask

    def _new_handle(self, handle: Handle) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = handle
        return fh

    def _open_nodes(self) -> set[int]:
        return {h.node for h in self._handles.values()}

    def _handle(self, fh: int) -> Handle:
        try:
            return self._handles[fh]
        except KeyError:
            raise FUSEError(errno.EBADF) from None

    def _attrs(self, inode: Inode, st: os.stat_result, entry_timeout: float = 0.0
               ) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode.node
        a.generation = 0
        a.entry_timeout = entry_timeout
        a.attr_timeout = self._timeout(inode)
        a.st_mode = st.st_mode
        a.st_nlink = st.st_nlink
        if self.idmap is None:
            a.st_uid, a.st_gid = st.st_uid, st.st_gid
        else:
            a.st_uid, a.st_gid = self.idmap.uids.to_view(st.st_uid), \
                self.idmap.gids.to_view(st.st_gid)
        a.st_rdev = st.st_rdev
        a.st_size = st.st_size
        a.st_blksize = st.st_blksize
        a.st_blocks = st.st_blocks
        a.st_atime_ns = st.st_atime_ns
        a.st_mtime_ns = st.st_mtime_ns
        a.st_ctime_ns = st.st_ctime_ns
        return a

    def _enter(self, parent: Inode, name: bytes, found: backing.Found, epoch: int,
               view: tuple[str, ...] = ()) -> pyfuse3.EntryAttributes:
        """Register a resolved name with the kernel (one lookup reference).

        epoch: the parent's search_epoch before the request started; view: the
        data filters reads through this name apply (a node of its own).
        """
        inode = self.table.remember(found.fd, found.st, parent, name, view)
        if inode.lookups == 1 and self.pressure is not None:
            self.pressure.grew(self.table, self._open_nodes)
        # With default_permissions the kernel checks search permission itself on
        # every step of a walk, cached or not: any name may be cached. A policy
        # that decides this name per caller forbids caching it: walks through
        # cached names never reach the policy.
        public = (found.parent_public or self.identity.kernel_checks_permissions) \
            and self._shared(parent, name, found.st)
        timeout = self.names.entry_timeout(parent, name, public, epoch, self._timeout(parent))
        return self._attrs(inode, found.st, timeout)

    def _known_public(self, directory: Inode) -> bool:
        """Is directory known to be searchable by everyone without looking?
        Only on the watched device, when seen so at its current search_epoch:
        every change through the mount that may reduce who can search it bumps
        that, and so does the watch for every change of its mode, owner or ACL
        behind the mount's back (within the watch's few milliseconds, as for
        what the kernel caches); a lost event forgets them all
        (watch.Target.watched_change)."""
        return directory.public_epoch == directory.search_epoch and \
            directory.key[0] == self.watched_dev

    def _saw_parent(self, directory: Inode, public: bool, epoch: int) -> None:
        """A fresh look at whether directory is searchable by everyone, made
        during a request that started at its search_epoch epoch."""
        if not public:
            directory.public_epoch = -1
        elif epoch == directory.search_epoch and directory.key[0] == self.watched_dev:
            directory.public_epoch = epoch

    def _timeout(self, inode: Inode) -> float:
        """How long the kernel may keep what it caches about inode (see cache.py)."""
        if inode.key[0] == self.watched_dev:
            return self.cache.watched_timeout
        return self.cache.timeout

    def _continuing(self, ctx: pyfuse3.RequestContext, parent: Inode, name: bytes,
                    exclusive: bool) -> None:
        """A request that makes name in parent (exclusive: as the kernel sent
        it): when it continues the syscall of the LOOKUP just before it, the
        caller resolved for that LOOKUP is its caller (continuation.py)."""
        caller = self.continuations.makes_after_lookup(ctx, parent.node, name, exclusive)
        if caller is not None and self.callers is not None:
            self.callers.carry(ctx, caller)

    def _creator(self, ctx: pyfuse3.RequestContext, parent: Inode, name: bytes,
                 is_dir: bool = False) -> tuple[Credentials, Act]:
        act = self._act(ctx, "create", parent, name, ObjectFacts(is_dir, None, new=True))
        return act.source.creator_creds(ctx, act.creds, parent), act

    async def _make(self, ctx: pyfuse3.RequestContext, parent: Inode, name: bytes,
                    is_dir: bool, make: Callable[..., backing.Found], *args: Any,
                    umask: int = 0, exclusive: bool = True) -> pyfuse3.EntryAttributes:
        """mknod, mkdir, symlink: made by the creator, entered, owner recorded.
        exclusive: surely sent with the kernel's LOOKUP_EXCL (continuation.py)."""
        self._continuing(ctx, parent, name, exclusive)
        creds, act = self._creator(ctx, parent, name, is_dir)
        epoch = parent.search_epoch
        try:
            found = await self._run(creds, make, parent.fd, name, *args, umask=umask,
                                   local=parent)
        except FUSEError as exc:
            raise await self._taken(ctx, parent, name, exc) from None
        return await self._created(act, self._enter(parent, name, found, epoch))

    async def _taken(self, ctx: pyfuse3.RequestContext, parent: Inode, name: bytes,
                     exc: FUSEError) -> FUSEError:
        """A create failed: with a policy, EEXIST for a name hidden from the
        caller would tell it is there; EACCES says no more than a refusal."""
        if exc.errno != errno.EEXIST or self.gate is None:
            return exc
        try:
            await self._act_named(ctx, "lookup", parent, name)
        except FUSEError as hidden:
            if hidden.errno == errno.ENOENT:
                return FUSEError(errno.EACCES)
        return exc

    async def _created(self, act: Act, entry: pyfuse3.EntryAttributes
                       ) -> pyfuse3.EntryAttributes:
        """A new object: record its creator when the policy asks about owners
        (the record outlives the daemon: it is on the backing file)."""
        if self._records_owners():
            inode = self.table.get(entry.st_ino)
            await self._run(_PROBE, backing.record_owner, inode.fd, act.caller_uid,
                            local=inode)
            inode.owner_uid = act.caller_uid
        return entry

    async def _stat_dir_after_change(self, node: Inode, creds: Credentials) -> None:
        """After a change through the mount to a directory's mode, owner or ACL."""
        _st, public = await self._run(creds, backing.stat_dir, node.fd, local=node)
        self.names.changed(node, public)

    # -- names ----------------------------------------------------------------

    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
                     ) -> pyfuse3.EntryAttributes:
        self.continuations.lookup(ctx)
        parent = self.table.get(parent_inode)
        act = await self._act_named(ctx, "lookup", parent, name)
        # Taken now: a lookup in a worker lets other requests resolve theirs.
        caller = self.callers.resolved(ctx) if self.callers is not None else None
        epoch = parent.search_epoch
        found = await self._run(act.creds, backing.lookup, parent.fd, name,
                                self._known_public(parent), local=parent)
        if found is None:
            try:
                entry = self._absent(parent, name, epoch)
            except FUSEError:
                self.continuations.absent(ctx, parent.node, name, False, caller)
                raise
            self.continuations.absent(ctx, parent.node, name, True, caller)
            return entry
        self._saw_parent(parent, found.parent_public, epoch)
        owner = await self._owner_of(found.fd) if self._records_owners() else None
        view = self._read_view(act, parent, name, found.st, owner)
        entry = self._enter(parent, name, found, epoch, view)
        self.table.get(entry.st_ino).owner_uid = owner
        return entry

    def _absent(self, parent: Inode, name: bytes, epoch: int) -> pyfuse3.EntryAttributes:
        """A name that is not there: a negative entry the kernel may cache, when
        every caller would get ENOENT for it and a creation behind the mount's
        back is reported (watch.py); otherwise ENOENT, asked again next time."""
        if parent.key[0] != self.watched_dev or \
                (self.gate is not None and
                 not self.gate.policy.lookup_uniform(self.table.path(parent, name))):
            raise FUSEError(errno.ENOENT)
        public = self.identity.kernel_checks_permissions or self._known_public(parent)
        if not public:
            try:
                public = backing.public_dir(parent.fd)  # looked at after the lookup
            except OSError:
                public = False
            self._saw_parent(parent, public, epoch)
        timeout = self.names.entry_timeout(parent, name, public, epoch, self._timeout(parent))
        if not timeout:
            raise FUSEError(errno.ENOENT)
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = 0  # negative: "no such name", for entry_timeout seconds
        entry.entry_timeout = timeout
        return entry

    def _read_view(self, act: Act, parent: Inode, name: bytes, st: os.stat_result,
                   owner: int | None) -> tuple[str, ...]:
        """The filters this caller reads the file through: its node's view."""
        if act.request is None or not stat.S_ISREG(st.st_mode):
            return ()
        d = act.request.decision("read", self.table.path(parent, name),
                                 ObjectFacts(False, owner))
        return d.filters if d.allow and not d.needs_object else ()

    async def _owner_of(self, fd: int) -> int | None:
        try:
            return await self._run(_PROBE, backing.read_owner, fd)
        except FUSEError:
            return None

    def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        pt = self.passthrough
        for node, count in inode_list:
            inode = self.table.known(node)
            holds_space = pt is not None and inode is not None and pt.registered(node) \
                and backing.deleted_and_large(inode.fd)
            if self.table.forget(node, count) and pt is not None:
                pt.forgotten(node, at_once=holds_space)

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext
                      ) -> pyfuse3.EntryAttributes:
        node = self.table.get(inode)
        # With a policy: it may refuse it (no one acts on a local filesystem).
        act = self._act(ctx, "lookup", node) if self.gate is not None else None
        if not self._covers(node):
            # On any other filesystem fstat may wait on a server (NFS, FUSE),
            # and the loop with it: a worker asks, as the caller.
            epoch = node.search_epoch
            creds = (act or self._act(ctx, "lookup", node)).creds
            st, public = await self._run(creds, _stat_node, node.fd, node.is_dir)
            return self._stat_seen(node, st, public, epoch)
        # fstat of the O_PATH descriptor checks no permission (the kernel
        # checked the walk to this node, as the caller, at lookup) and does not
        # block on a local filesystem: done here, without a worker's hop.
        try:
            st, public = _stat_node(node.fd, node.is_dir)
        except OSError as exc:
            raise FUSEError(exc.errno or errno.EIO) from None
        return self._stat_seen(node, st, public, node.search_epoch)

    def _stat_seen(self, node: Inode, st: os.stat_result, public: bool, epoch: int
                   ) -> pyfuse3.EntryAttributes:
        """getattr's reply; a directory's searchability noted (see _saw_parent)."""
        if node.is_dir:
            self.names.observed(node, public)
            self._saw_parent(node, public, epoch)
        return self._attrs(node, st)

    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self.table.get(inode)
        change = backing.AttrChange(
            mode=attr.st_mode & 0o7777 if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            size=attr.st_size if fields.update_size else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
        )
        change.touch = _is_touch(attr, fields)
        ops = ["write"] if change.size is not None else []
        if fields.update_mode or fields.update_uid or fields.update_gid \
                or fields.update_atime or fields.update_mtime:
            ops.append("setattr")
        act = self._act_all(ctx, ops or ["setattr"], node)
        if self.idmap is not None and (fields.update_uid or fields.update_gid):
            try:
                change.uid, change.gid = self.idmap.owner_to_backing(change.uid, change.gid)
            except OSError as exc:
                raise FUSEError(errno.EINVAL) from exc
        if change.size is not None:
            change.kill_privs = act.source.kills_privileges(ctx)
        creds = act.creds
        fd = None if fh is None else self._handle(fh).fd
        try:
            # A truncate may wait for a lease holder: only that goes to a worker.
            st = await self._run(creds, backing.setattr_, node.fd, fd, change,
                                 local=node if change.size is None else None)
        except FUSEError as exc:
            if exc.errno != errno.EPERM or change.mode is None:
                raise
            st = await self._kill_setid_for_writer(node, creds, fd, change, ctx)
        if node.is_dir and (change.mode is not None or change.uid is not None
                            or change.gid is not None):
            await self._stat_dir_after_change(node, creds)
        return self._attrs(node, st)

    async def _kill_setid_for_writer(self, node: Inode, creds: Credentials, fd: int | None,
                                     change: backing.AttrChange,
                                     ctx: pyfuse3.RequestContext) -> os.stat_result:
        """The kernel's own suid/sgid kill before a write or truncate.

        Natively the kernel clears these bits for any writer (ATTR_FORCE); over
        FUSE (no FUSE_HANDLE_KILLPRIV from pyfuse3) it sends a plain chmod that
        the backing filesystem refuses a caller who does not own the file. So a
        chmod that only clears setuid/setgid, by a caller who may write the file
        and whose thread is in a write syscall (so it is the kernel's kill on
        its behalf, not a chmod or chown it asked for), is done as the file's
        owner (no capabilities), and the rest of the request as the caller.
        """
        assert change.mode is not None
        current = await self._run(creds, backing.getattr_, node.fd, local=node)
        if not backing.only_clears_setid(current.st_mode, change.mode):
            raise FUSEError(errno.EPERM)
        self.as_daemon()  # /proc/<tid>/syscall needs ptrace access: the daemon's
        syscall = caller.current_syscall(ctx.pid) if ctx.pid > 0 else None
        if syscall not in syscalls.WRITE_FAMILY:
            raise FUSEError(errno.EPERM)  # the caller's own chmod/chown: refused as natively
        try:
            await self._run(creds, backing.access, node.fd, os.W_OK, local=node)
        except FUSEError:
            raise FUSEError(errno.EPERM) from None
        owner = Credentials(current.st_uid, current.st_gid, (current.st_gid,), 0)
        await self._run(owner, backing.setattr_, node.fd, None,
                        backing.AttrChange(mode=change.mode), local=node)
        rest = dataclasses.replace(change, mode=None)
        return await self._run(creds, backing.setattr_, node.fd, fd, rest,
                               local=node if rest.size is None else None)

    async def _kill_caps_for_writer(self, node: Inode, creds: Credentials,
                                    ctx: pyfuse3.RequestContext) -> None:
        """The kernel's own removal of file capabilities before a write or
        truncate (file_remove_privs). Natively it needs no right at all; over
        FUSE it arrives as removexattr("security.capability") from the writer,
        which the backing filesystem refuses without CAP_SETFCAP. So a caller
        who may write the file and whose thread is in a write, truncate or
        O_TRUNC open (the kernel acting for it, not a removexattr it asked for)
        has it removed with CAP_SETFCAP alone, and nothing else."""
        self.as_daemon()  # /proc/<tid>/syscall needs ptrace access: the daemon's
        syscall = caller.current_syscall(ctx.pid) if ctx.pid > 0 else None
        if syscall not in syscalls.KILL_PRIV_FAMILY:
            raise FUSEError(errno.EPERM)  # the caller's own removexattr: refused as natively
        try:
            await self._run(creds, backing.access, node.fd, os.W_OK, local=node)
        except FUSEError:
            raise FUSEError(errno.EPERM) from None
        await self._run(_CAPS_KILLER, backing.removexattr, node.fd, _CAPS_XATTR, local=node)

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        node = self.table.get(inode)
        return await self._run(self._act(ctx, "lookup", node).creds, backing.readlink, node.fd,
                               local=node)

    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        parent = self.table.get(parent_inode)
        return await self._make(ctx, parent, name, False, backing.mknod, mode, rdev,
                                umask=self._umask(ctx), exclusive=mknod_is_exclusive(mode))

    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        parent = self.table.get(parent_inode)
        return await self._make(ctx, parent, name, True, backing.mkdir, mode,
                                umask=self._umask(ctx))

    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        parent = self.table.get(parent_inode)
        return await self._make(ctx, parent, name, False, backing.symlink, target)

    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self.table.get(inode)
        parent = self.table.get(new_parent_inode)
        epoch = parent.search_epoch
        # A new name for a file is a way to change it (a policy may give its
        # callers everything under some names): like protected_hardlinks, only
        # for a caller that may read and write it.
        self._act_all(ctx, ["read", "write"], node)
        creds = self._act(ctx, "create", parent, new_name,
                          ObjectFacts(node.is_dir, node.owner_uid)).creds
        try:
            found = await self._run(creds, backing.link, node.fd, parent.fd, new_name,
                                   local=parent)
        except FUSEError as exc:
            raise await self._taken(ctx, parent, new_name, exc) from None
        return self._enter(parent, new_name, found, epoch)

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
                     ) -> None:
        parent = self.table.get(parent_inode)
        act = await self._act_named(ctx, "delete", parent, name)
        await self._run(act.creds, backing.unlink, parent.fd, name, local=parent)
        self.names.removed(parent, name)

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
                    ) -> None:
        parent = self.table.get(parent_inode)
        act = await self._act_named(ctx, "delete", parent, name)
        await self._run(act.creds, backing.rmdir, parent.fd, name, local=parent)
        self.names.removed(parent, name)

    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: pyfuse3.RequestContext) -> None:
        old = self.table.get(parent_inode_old)
        new = self.table.get(parent_inode_new)
        creds = (await self._act_named(ctx, "rename", old, name_old)).creds
        try:
            self._act(ctx, "rename", new, name_new)
        except NeedsObject as need:
            # The file replaced at the target, or, when the name is new, the
            # file that will be there.
            (target,) = await self._run(_PROBE, backing.probe, new.fd, [name_new], local=new)
            if target is None:
                (target,) = await self._run(_PROBE, backing.probe, old.fd, [name_old],
                                            local=old)
            need.request.act(need.op, need.path,
                             ObjectFacts(*target) if target else ObjectFacts(False, None, True))
        exchange = bool(flags & pyfuse3.RENAME_EXCHANGE)
        if self.gate is not None:
            await self._check_moved_trees(ctx, old, name_old, new, name_new, exchange)
        await self._run(creds, backing.rename, old.fd, name_old, new.fd, name_new, flags,
                        local=old)
        if self.gate is not None:
            # Policies match paths: what moved is now known by its new name.
            for d, n in ((new, name_new), (old, name_old))[:2 if exchange else 1]:
                key = await self._run(creds, backing.key_at, d.fd, n)
                if key is not None:
                    self.table.moved(key, d, n)
        public = {old.node: True, new.node: True}
        if not self.identity.kernel_checks_permissions and (
                name_old in old.cached_names or (exchange and name_new in new.cached_names)):
            # Only a name the kernel holds with a positive timeout needs a look
            # at where it landed.
            for d in (old, new):
                public[d.node] = (await self._run(creds, backing.stat_dir, d.fd, local=d))[1]
        self.names.renamed(old, name_old, new, name_new, public, exchange)

    async def _check_moved_trees(self, ctx: pyfuse3.RequestContext, old: Inode,
                                 name_old: bytes, new: Inode, name_new: bytes,
                                 exchange: bool) -> None:
        """Moving a directory moves everything in it: every file below must be
        one the caller may rename, from where it is to where it would be (a
        directory of one's own may hold what others own). A tree too large to
        check is refused with EXDEV, so that mv moves it file by file."""
        moves = [(old, name_old, new, name_new)]
        if exchange:
            moves.append((new, name_new, old, name_old))
        assert self.gate is not None
        request = self.gate.begin(ctx)
        for src, src_name, dst, dst_name in moves:
            tree = await self._run(_PROBE, backing.walk_tree, src.fd, src_name, _MOVE_CHECK_LIMIT)
            if tree is None:
                raise FUSEError(errno.EXDEV)
            src_path = self.table.path(src, src_name)
            dst_path = self.table.path(dst, dst_name)
            for rel, is_dir, owner in tree:
                obj = ObjectFacts(is_dir, owner)
                request.act("rename", f"{src_path}/{rel}", obj)
                request.act("rename", f"{dst_path}/{rel}", obj)

    # -- files ----------------------------------------------------------------

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext
                   ) -> pyfuse3.FileInfo:
        node = self.table.get(inode)
        act = self._act_all(ctx, _open_ops(flags), node)
        if any(f not in node.view for f in act.filters):
            # This caller must read through filters this node's page cache was
            # not filled through (the policy changed since the lookup): the
            # kernel retries an ESTALE open with a fresh lookup, which gives
            # the node of the right view.
            raise FUSEError(errno.ESTALE)
        creds = opener = act.creds
        if flags & backing.FMODE_EXEC and not self.identity.kernel_checks_permissions:
            # execve needs x, not r: check x as the caller, then open for the
            # kernel to read the image as the kernel itself would (the file is
            # never handed to the caller's userspace).
            await self._run(creds, backing.access, node.fd, os.X_OK, local=node)
            opener = dataclasses.replace(creds, caps=creds.caps | cap_bit(CAP_DAC_READ_SEARCH))
        try:
            # Only a lease holder can make an open of a local file wait: try
            # without waiting (inline), and let a worker wait if it must.
            fd = await self._run(opener, backing.open_nowait, node.fd, flags, local=node)
        except FUSEError as exc:
            if exc.errno != errno.EWOULDBLOCK or flags & os.O_NONBLOCK:
                raise
            fd = await self._run(opener, backing.open_, node.fd, flags)
        try:
            if flags & os.O_TRUNC and act.source.kills_privileges(ctx):
                # FUSE's atomic O_TRUNC skips the kernel's own suid/sgid kill, and
                # the mounter truncating for the caller may hold CAP_FSETID.
                await self._run(creds, backing.kill_privileges, fd)
            # The filters' spans are found now, not on the first read.
            version = await self._run(creds, filters.prepare, fd, node.view) \
                if node.view else None
        except BaseException:
            os.close(fd)  # no handle yet: the kernel will never release it
            raise
        handle = Handle(fd, creds, node=inode)
        await self._append_per_write(handle, flags, node)
        writable = flags & os.O_ACCMODE != os.O_RDONLY
        if writable:
            handle.kill_privs = act.source.kills_privileges(ctx)
        handle.filters = node.view
        choice = await self._choose_io(node, handle, writable)
        fi = self._file_info(self._new_handle(handle), choice)
        if node.view:
            # The page cache of this node holds filtered pages of the version it
            # was filled from: keep it only if the file has not changed since
            # (through the unfiltered node, or behind the mount).
            fi.keep_cache = self.cache.keep_page_cache and version == node.cached_version
            node.cached_version = version
        return fi

    async def _choose_io(self, node: Inode, handle: Handle, writable: bool) -> Choice:
        """Passthrough, page cache or direct I/O for a new open file of node."""
        if self.passthrough is None:
            choice = _CACHED
        else:
            opener: Credentials | None = registration_for(
                handle.creds, kills_setid(handle.creds, handle.kill_privs))
            if writable and handle.kill_privs and not _stands_in_for_caller(handle):
                opener = None  # writes through the daemon, which clears bits as decided
            choice = await self.passthrough.choose(node.node, node.fd, node.key[0], node.mode,
                                                   bool(node.view), opener, writable)
        handle.io = choice.io
        if choice.io is Io.CACHED:
            node.paged = True  # from this reply on, the kernel may cache its pages
        return choice

    def _file_info(self, fh: int, choice: Choice) -> pyfuse3.FileInfo:
        fi = pyfuse3.FileInfo(fh=fh)
        fi.keep_cache = self.cache.keep_page_cache and choice.keep_cache
        if self.noflush:
            fi.noflush = True
        if choice.io is not Io.CACHED:
            fi.backing_id = choice.backing_id
            fi.direct_io = choice.io is Io.DIRECT
        return fi

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext
                     ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        parent = self.table.get(parent_inode)
        self._continuing(ctx, parent, name, exclusive=bool(flags & os.O_EXCL))
        if self.gate is not None:
            (existing,) = await self._run(_PROBE, backing.probe, parent.fd, [name])
            if existing is not None:
                return await self._create_existing(parent, name, flags, existing, ctx)
            # Decided for a new file: it must be one (a file made meanwhile by
            # someone else is not the caller's to open by creating it).
            flags |= os.O_EXCL
        act = self._act(ctx, "create", parent, name, ObjectFacts(False, None, new=True))
        creds = act.creds
        maker = act.source.creator_creds(ctx, creds, parent)
        epoch = parent.search_epoch
        try:
            # Only a new name (O_EXCL) runs inline: opening an existing file may
            # wait for a lease holder.
            fd, found = await self._run(maker, backing.create, parent.fd, name, flags, mode,
                                        self._known_public(parent), umask=self._umask(ctx),
                                        local=parent if flags & os.O_EXCL else None)
        except FUSEError as exc:
            raise await self._taken(ctx, parent, name, exc) from None
        self._saw_parent(parent, found.parent_public, epoch)
        entry = await self._created(act, self._enter(parent, name, found, epoch))
        handle = Handle(fd, creds, node=entry.st_ino,
                        kill_privs=act.source.kills_privileges(ctx))
        await self._append_per_write(handle, flags, parent)
        choice = await self._choose_io(self.table.get(entry.st_ino), handle,
                                       flags & os.O_ACCMODE != os.O_RDONLY)
        return self._file_info(self._new_handle(handle), choice), entry

    async def _create_existing(self, parent: Inode, name: bytes, flags: int,
                               existing: tuple[bool, int | None],
                               ctx: pyfuse3.RequestContext
                               ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        """open(O_CREAT) of a name that exists (the kernel may send CREATE
        without asking first): an open of that file, decided on it. A name
        hidden from the caller cannot be created either: EACCES, not EEXIST."""
        try:
            act = self._act(ctx, "lookup", parent, name, ObjectFacts(*existing))
        except FUSEError as exc:
            raise FUSEError(errno.EACCES if exc.errno == errno.ENOENT else exc.errno) from None
        if flags & os.O_EXCL:
            raise FUSEError(errno.EEXIST)
        epoch = parent.search_epoch
        found = await self._run(act.creds, backing.open_path, parent.fd, name)
        view = self._read_view(act, parent, name, found.st, existing[1])
        entry = self._enter(parent, name, found, epoch, view)
        inode = self.table.get(entry.st_ino)
        inode.owner_uid = existing[1]
        try:
            fi = await self.open(entry.st_ino, flags & ~(os.O_CREAT | os.O_EXCL), ctx)
        except BaseException:
            self.table.forget(entry.st_ino, 1)  # the kernel never got the entry
            raise
        return fi, entry

    async def read(self, fh: int, off: int, size: int) -> bytes:
        h = self._handle(fh)
        if h.filters:
            return await self._run(h.creds, filters.filtered_pread, h.fd, off, size, h.filters)
        return await self._run(h.creds, backing.read, h.fd, off, size)

    async def write(self, fh: int, off: int, buf: bytes, flags: int = 0) -> int:
        # As the opener: the kernel clears setuid bits on write unless the
        # writer holds CAP_FSETID, so the writer must be the caller, not us.
        # O_APPEND as the caller's file has it at this write (flags: 0 from
        # a stock pyfuse3, whose opens keep O_APPEND on the backing file).
        append = bool(flags & os.O_APPEND)
        h = self._handle(fh)
        return await self._run(h.creds, backing.write, h.fd, off, buf, h.kill_privs, append)

    async def _append_per_write(self, h: Handle, flags: int, node: Inode) -> None:
        """A file opened with O_APPEND: the backing descriptor keeps it only
        when the kernel does not tell each write's flags (a stock pyfuse3) or
        the file is append-only; otherwise each write appends as the caller's
        file says then, so that fcntl(F_SETFL) clearing or setting O_APPEND
        after the open counts. (Writes through kernel passthrough never come
        here: the kernel's own backing file keeps the open's flags.)"""
        if flags & os.O_APPEND and self.enable_write_flags:
            try:
                await self._run(h.creds, backing.drop_append, h.fd, local=node)
            except FUSEError:
                pass  # O_APPEND stays: every write appends, as before

    async def fallocate(self, fh: int, mode: int, off: int, length: int) -> None:
        # As the opener, like write: the kernel checked the open file is
        # writable; the backing filesystem decides the rest as natively.
        h = self._handle(fh)
        await self._run(h.creds, backing.fallocate, h.fd, mode, off, length, h.kill_privs)

    async def flush(self, fh: int) -> None:
        h = self._handle(fh)
        if self.flush_is_noop:
            # Nothing to report, and its dup could only fail, for want of
            # descriptors: the caller's close() would return EMFILE.
            return
        await self._run(h.creds, backing.flush, h.fd)

    async def release(self, fh: int) -> None:
        h = self._handles.pop(fh, None)
        if h is not None:
            if self.passthrough is not None:
                self.passthrough.released(h.node, h.io)
            await self._close(h)

    async def fsync(self, fh: int, datasync: bool) -> None:
        h = self._handle(fh)
        await self._run(h.creds, backing.fsync, h.fd, datasync)

    # -- directories ----------------------------------------------------------

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        node = self.table.get(inode)
        if self.gate is None:
            act = self._act(ctx, "list", node)
            decide = None
        else:
            # Decided now, by the policy in force now: the open directory keeps
            # this decision, as an open file does.
            request = self.gate.begin(ctx)
            path = self.table.path(node)
            act = request.act("list", path, ObjectFacts(node.is_dir, node.owner_uid))
            prefix = f"{path}/" if path else ""

            def decide(op: str, name: bytes, obj: ObjectFacts | None) -> Decision:
                return request.decision(op, prefix + name.decode("utf-8", "surrogateescape"),
                                        obj)
        fd = await self._run(act.creds, backing.opendir, node.fd, local=node)
        return self._new_handle(Handle(fd, act.creds, node=inode, decide=decide))

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        h = self._handle(fh)
        parent = self.table.get(h.node)
        if start_id == 0 or h.entries is None:
            # A snapshot per pass: offsets stay stable while the directory changes.
            # Kept only once complete: a pass that fails half way (the
            # policy's probe) must leave nothing unfiltered for a listing
            # resumed at an offset.
            h.entries = None
            if h.decide is None and listing.PACKED:
                h.listed = await self._packed_pass(fh, h, parent)
                h.entries = h.listed.snapshot
            else:
                local = parent if self._covers(parent) \
                    and listing.inline_size(os.fstat(h.fd)) else None
                entries = await self._run(h.creds, backing.list_dir, h.fd, local=local)
                if h.decide is not None:
                    entries, h.owners = await self._visible(h, entries)
                h.entries = entries
        entries = h.entries
        pos = max(start_id, _DOTS) - _DOTS
        if listing.is_plain(token):
            ready = await self._ready(h, pos + listing.STREAM_AHEAD)
            listing.reply_plain(token, entries, start_id, h.node, ready)
            return
        # Offsets 0 and 1 are "." and "..": the kernel takes no reference for
        # them, so they get no node of their own (d_ino is the directory's).
        for dot in range(start_id, _DOTS):
            if not pyfuse3.readdir_reply(token, (b".", b"..")[dot], self._dot_attrs(h.node),
                                         dot + 1):
                return
        batch = 32
        nodes_pay: bool | None = None  # asked once, when a name is not in the kernel yet
        ready = await self._ready(h, pos + 1)
        while pos < ready:
            chunk = listing.entries_of(entries, pos, min(pos + batch, ready))
            if listing.is_packed(entries):
                # A node only where it can be of use (see _nodes_pay); the rest
                # are listed without one, as in a plain reply.
                linked = [not self._in_kernel(parent, e) for e in chunk]
                if any(linked) and nodes_pay is None:
                    nodes_pay = await self._nodes_pay(h, parent)
                runs = listing.runs(linked if nodes_pay else [False] * len(chunk))
            else:
                runs = [(0, len(chunk), True)]
            for i, j, link in runs:
                if link:
                    if not await self._reply_linked(h, parent, token, chunk[i:j], pos + i):
                        return
                elif not listing.reply_unlinked(token, entries, pos + i, pos + j):
                    return
            pos += len(chunk)
            if pos == ready:
                ready = await self._ready(h, pos + 1)

    async def _ready(self, h: Handle, want: int) -> int:
        """How many of the open directory's listed entries may be replied: in a
        pass still being read, once want are or it has ended."""
        if h.listed is None:
            assert h.entries is not None
            return len(h.entries)
        try:
            return await h.listed.until(want)
        except OSError as exc:
            raise FUSEError(exc.errno or errno.EIO) from None

    async def _packed_pass(self, fh: int, h: Handle, parent: Inode) -> passes.Pass:
        """The directory as it is now, without a policy: another opener's pass
        when it shows just that (see passes.py), else a pass of h's own.

        A large directory is read by a worker, streamed (passes.Pass): its
        getdents run without the GIL, so the loop serves others meanwhile,
        this opener's first chunks included. Its status is asked only on a
        local device: fstat on any other may wait on a server, and the loop
        with it."""
        if h.listed is not None and not h.listed.complete:
            # A rewind while h's last pass still reads: that pass reads on a
            # copy of h's descriptor, which shares its file offset.
            await h.listed.done.wait()
        if not self._covers(parent):
            packed, as_anyone = await self._run(h.creds, backing.list_dir_packed, h.fd,
                                                listing.FIRST_OFF)
            return passes.Pass.whole(packed, fh, as_anyone)
        clock = passes.clock_ns()
        st = os.fstat(h.fd)
        joined = self.passes.joinable(h.node, passes.stamp(st))
        if joined is not None:
            await joined.done.wait()
            if joined.shareable:
                log.debug("listing node %d: takes the pass of handle %d", h.node, joined.owner)
                return joined
            clock = passes.clock_ns()  # of no use: a pass of h's own, as of now
            st = os.fstat(h.fd)
        if listing.inline_size(st):
            packed, as_anyone = await self._run(h.creds, backing.list_dir_packed, h.fd,
                                                listing.FIRST_OFF, local=parent)
            p = passes.Pass.whole(packed, fh, as_anyone)
            if as_anyone:
                self.passes.offer(h.node, p, st, clock)
            return p
        try:
            fd = os.dup(h.fd)  # h may be closed while its pass reads on
        except OSError as exc:  # out of descriptors: this listing fails, not the daemon
            raise FUSEError(exc.errno or errno.EIO) from None
        p = passes.Pass(pyfuse3.PackedListing(listing.FIRST_OFF), fh)
        self.passes.offer(h.node, p, st, clock)

        def finished(result: outcome.Outcome[bool]) -> None:
            os.close(fd)
            error: OSError | None = None
            try:
                p.as_anyone = result.unwrap()
            except CredentialError:  # fail closed: the opener's listing fails
                error = OSError(errno.EACCES, os.strerror(errno.EACCES))
            except OSError as exc:
                error = exc
            except Exception:  # on the loop: must not end the daemon
                log.exception("reading directory node %d", h.node)
                error = OSError(errno.EIO, os.strerror(errno.EIO))
            p.finish(error)
            if not p.shareable:
                self.passes.withdraw(h.node, p)

        self.pool.submit(h.creds, 0, backing.read_pass, fd, p.snapshot,
                         self.pool.on_loop(p.grew), done=finished)
        return p

    def _in_kernel(self, parent: Inode, entry: backing.DirEntry) -> bool:
        """Is the listed name a node the kernel got from us by this very name
        in this directory, and may cache (so it most likely has its dentry)?
        Then a readdirplus entry for it would only repeat what it has."""
        name, _type_bits, ino = entry
        node = self.table.plain(parent.key[0], ino)
        return node is not None and node.parent is parent and node.name == name \
            and name in parent.cached_names

    async def _nodes_pay(self, h: Handle, parent: Inode) -> bool:
        """Would nodes given in a readdirplus reply for names in this directory
        be of any use? Not when their entries could not be cached (a zero
        timeout; the directory not searchable by everyone): the kernel would
        look each name up again, as its caller, before any use of it."""
        if not self._timeout(parent):
            return False
        if self.identity.kernel_checks_permissions:
            return True
        return await self._run(h.creds, backing.public_dir, h.fd, local=parent)

    async def _reply_linked(self, h: Handle, parent: Inode, token: pyfuse3.ReaddirToken,
                            chunk: list[backing.DirEntry], pos: int) -> bool:
        """Entries of chunk, the first at position pos of the listing, each with
        a node (a lookup reference) into a readdirplus reply: names are resolved
        as the opener. False when the kernel's buffer is full."""
        epoch = parent.search_epoch
        found = await self._run(h.creds, backing.lookup_listed, h.fd, chunk, local=parent)
        for i, ((name, type_bits, _ino), item) in enumerate(zip(chunk, found, strict=True)):
            if isinstance(item, OSError):
                if item.errno == errno.ENOENT or not type_bits:
                    continue  # gone since it was listed
                attrs = self._placeholder_attrs(type_bits)
            elif name in h.listed_refused:
                # Listed, but the opener may not look it up: no node the
                # kernel could walk through, as for an unsearchable parent.
                os.close(item.fd)
                attrs = self._placeholder_attrs(stat.S_IFMT(item.st.st_mode))
            else:
                view = h.listed_views.get(name, ()) \
                    if stat.S_ISREG(item.st.st_mode) else ()
                attrs = self._enter(parent, name, item, epoch, view)
                if h.owners is not None:
                    self.table.get(attrs.st_ino).owner_uid = h.owners.get(name)
            if not pyfuse3.readdir_reply(token, name, attrs, _DOTS + pos + i + 1):
                # The kernel's buffer is full: this entry was not sent.
                self.table.forget(attrs.st_ino, 1)
                for rest in found[i + 1:]:
                    if not isinstance(rest, OSError):
                        os.close(rest.fd)
                return False
        return True

    async def _visible(self, h: Handle, entries: list[backing.DirEntry]
                       ) -> tuple[list[backing.DirEntry], dict[bytes, int | None] | None]:
        """The entries the policy does not hide from the opener, and, when the
        policy asks about owners, each one's recorded owner."""
        assert h.decide is not None
        undecided = [e[0] for e in entries if h.decide("lookup", e[0], None).needs_object]
        probe_all = self._records_owners()
        names = [e[0] for e in entries] if probe_all else undecided
        facts: dict[bytes, tuple[bool, int | None] | tuple[()] | None] = {}
        if names:
            # One name that cannot be looked at (a dead mount on it) is decided
            # as unknown, as natively it is listed: not an error for them all.
            found = await self._run(_PROBE, backing.probe, h.fd, names, True,
                                    local=self.table.get(h.node))
            facts = dict(zip(names, found, strict=True))
        visible = []
        h.listed_views = {}
        h.listed_refused = set()
        for e in entries:
            name = e[0]
            f = facts.get(name)
            if name in facts and f is None:
                continue  # gone since it was listed
            # Every undecided name was probed: the decision is final now (an
            # UNREADABLE one's is taken without its file: one that needs it is
            # hidden).
            obj = ObjectFacts(*f) if f else None
            decision = h.decide("lookup", name, obj)
            if decision.hides or decision.needs_object:
                continue
            visible.append(e)
            read = h.decide("read", name, obj)
            if not decision.allow or (read.needs_object and not (f and f[0])):
                # Listed, but no node for it: refused, or its view (data
                # filters) would need a look at the file first.
                h.listed_refused.add(name)
            elif read.allow and not read.needs_object and read.filters:
                h.listed_views[name] = read.filters
        owners = {n: f[1] for n, f in facts.items() if f} if probe_all else None
        return visible, owners

    @staticmethod
    def _dot_attrs(node: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = node
        a.st_mode = stat.S_IFDIR
        a.entry_timeout = 0
        a.attr_timeout = 0
        return a

    def _placeholder_attrs(self, type_bits: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = self.table.placeholder(type_bits).node
        a.st_mode = type_bits
        a.st_nlink = 1
        a.entry_timeout = 0
        a.attr_timeout = 0
        return a

    async def releasedir(self, fh: int) -> None:
        h = self._handles.pop(fh, None)
        if h is not None:
            self.passes.release(h.node, fh)
            await self._close(h)

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        h = self._handle(fh)
        await self._run(h.creds, backing.fsync, h.fd, datasync)

    # -- whole filesystem ----------------------------------------------------

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        root = self.table.get(pyfuse3.ROOT_INODE)
        sv = await self._run(self._act(ctx, "lookup", root).creds, backing.statfs, root.fd,
                             local=root)
        out = pyfuse3.StatvfsData()
        for name in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                     "f_ffree", "f_favail", "f_namemax"):
            setattr(out, name, getattr(sv, name))
        return out

    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        # Refusals propagate with their own errno (EACCES, EROFS, ETXTBSY...),
        # exactly as faccessat() gave it.
        node = self.table.get(inode)
        ops = ["access"]
        if mode & os.R_OK:
            ops.append("list" if node.is_dir else "read")
        if mode & os.W_OK:
            ops.append("create" if node.is_dir else "write")
        await self._run(self._act_all(ctx, ops, node).creds, backing.access, node.fd, mode,
                        local=node)
        return True

    # -- extended attributes -------------------------------------------------

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if inode == pyfuse3.ROOT_INODE and name == CREDS_XATTR:
            return self.describe().encode()
        if name.startswith(_RESERVED_XATTR_PREFIX):
            raise FUSEError(errno.ENODATA)
        node = self.table.get(inode)
        if name == _CAPS_XATTR and self.gate is None and self._caps_read_by_anyone(node):
            return self._file_caps(node)
        # Reading extended attributes is seeing the file; "xattr" is changing them.
        return await self._run(self._act(ctx, "lookup", node).creds, acl.getxattr,
                               node.fd, name, self.idmap, local=node)

    def _caps_read_by_anyone(self, node: Inode) -> bool:
        """Is node's security.capability what anyone reading it would get,
        read on the loop thread? On these filesystems, yes: the VFS checks no
        permission to read security.* (xattr_permission) and their xattr
        handlers check nothing of the reader (some do: ZFS's directory-based
        xattrs; and other security.* names may be shown per reader by an LSM,
        SELinux's contexts by CAP_MAC_ADMIN)."""
        dev = node.key[0]
        plain = self._caps_plain.get(dev)
        if plain is None:
            plain = self._caps_plain[dev] = self.inline is not None \
                and self.inline.covers(dev) and local_type(dev) in _PLAIN_XATTR_TYPES
        return plain

    def _file_caps(self, node: Inode) -> bytes:
        """security.capability, read as whoever the loop thread is now, without
        asking who the caller is (see _caps_read_by_anyone). The kernel asks for
        it before every write to a file (file_remove_privs, passthrough writes
        too): on the watched device its absence is remembered until the watch
        reports a change of the file's attributes or it is set through the
        mount."""
        watched = node.key[0] == self.watched_dev
        if watched and node.caps_absent:
            raise FUSEError(errno.ENODATA)
        try:
            return backing.getxattr(node.fd, _CAPS_XATTR)
        except OSError as exc:
            if exc.errno == errno.ENODATA and watched:
                node.caps_absent = True
            raise FUSEError(exc.errno or errno.EIO) from None

    def _caps_may_have_changed(self, node: Inode) -> None:
        """Forget that the file of node had no capabilities (every node of it)."""
        for inode in self.table.inodes_of(*node.key[:2]):
            inode.caps_absent = False

    async def setxattr(self, inode: int, name: bytes, value: bytes,
                       ctx: pyfuse3.RequestContext) -> None:
        if (inode == pyfuse3.ROOT_INODE and name == CREDS_XATTR) or \
                name.startswith(_RESERVED_XATTR_PREFIX):
            raise FUSEError(errno.EPERM)  # read-only: recorded once, at mount / by credfs
        node = self.table.get(inode)
        creds = self._act(ctx, "xattr", node).creds
        try:
            await self._run(creds, acl.setxattr, node.fd, name, value, self.idmap, local=node)
        finally:
            if name == _CAPS_XATTR:
                self._caps_may_have_changed(node)
        if name in _ACL_NAMES and node.is_dir:
            await self._stat_dir_after_change(node, creds)

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        node = self.table.get(inode)
        names = await self._run(self._act(ctx, "lookup", node).creds, backing.listxattr,
                                node.fd, local=node)
        return [n for n in names if not n.startswith(_RESERVED_XATTR_PREFIX)]

    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        if (inode == pyfuse3.ROOT_INODE and name == CREDS_XATTR) or \
                name.startswith(_RESERVED_XATTR_PREFIX):
            raise FUSEError(errno.EPERM)
        node = self.table.get(inode)
        creds = self._act(ctx, "xattr", node).creds
        try:
            await self._run(creds, backing.removexattr, node.fd, name, local=node)
        except FUSEError as exc:
            if exc.errno != errno.EPERM or name != _CAPS_XATTR:
                raise
            await self._kill_caps_for_writer(node, creds, ctx)
        if name in _ACL_NAMES and node.is_dir:
            await self._stat_dir_after_change(node, creds)



def _stat_node(fd: int, is_dir: bool) -> tuple[os.stat_result, bool]:
    """Attributes of a node, and for a directory whether everyone may search it."""
    if is_dir:
        return backing.stat_dir(fd)
    return backing.getattr_(fd), False


def _stands_in_for_caller(handle: Handle) -> bool:
    """May writes run as handle.creds where the daemon decides setuid/setgid
    clearing for another (mounter mode: by the caller's CAP_FSETID, as
    overlayfs)? Only for a file without such bits at open: a write through the
    daemon clears them as decided (see the README for a bit set while open)."""
    return not os.fstat(handle.fd).st_mode & (stat.S_ISUID | stat.S_ISGID)


def _open_ops(flags: int) -> list[str]:
    access = flags & os.O_ACCMODE
    ops = [] if access == os.O_WRONLY else ["read"]
    if access != os.O_RDONLY or flags & os.O_TRUNC:
        ops.append("write")
    return ops


# Guard every request handler (not the plumbing above, which they call).
for _name, _fn in list(vars(Operations).items()):
    if inspect.iscoroutinefunction(_fn) and not _name.startswith("_"):
        setattr(Operations, _name, _guarded(_fn))
