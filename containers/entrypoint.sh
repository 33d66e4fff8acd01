#!/bin/sh
# credfs container entrypoint: serve one volume with options from the environment.
#
#   CREDFS_SOURCE      directory to serve (required), e.g. a host directory bind-mounted in
#   CREDFS_MOUNTPOINT  where to mount it (required; created if missing). Share it with
#                      other containers through a bind mount with rshared propagation.
#   CREDFS_CREDS       caller (default) or mounter
#   CREDFS_UID_MAP     --uid-map MOUNT_ID:BACKING_ID:COUNT[,...] (optional)
#   CREDFS_GID_MAP     --gid-map, the same for groups (optional)
#   CREDFS_POLICY      a policy file, passed as --policy (optional)
#   CREDFS_OPTIONS     extra -o mount options, comma-separated (optional)
#   CREDFS_CACHE       none, auto or always (optional)
#   CREDFS_MISSING_GROUPS  deny (default) or nss (optional)
#   CREDFS_LOG_LEVEL   DEBUG, INFO (default), WARNING or ERROR
#   CREDFS_COMMAND     how to run credfs (default: credfs)
#
# It checks the environment first and says what is wrong in one line (exit 2),
# then execs `credfs mount --foreground`: credfs becomes the container's main
# process and receives SIGTERM from `docker stop` or a pod's deletion itself,
# which unmounts cleanly (lazily if busy) and exits 0.
set -eu

die() {
    printf 'credfs-entrypoint: %s\n' "$*" >&2
    exit 2
}

map_ok() {  # MOUNT_ID:BACKING_ID:COUNT[,...], digits only; credfs checks the rest
    printf '%s\n' "$1" | grep -Eq '^[0-9]+:[0-9]+:[0-9]+(,[0-9]+:[0-9]+:[0-9]+)*$'
}

[ -n "${CREDFS_SOURCE:-}" ] || die "CREDFS_SOURCE is not set (the directory to serve)"
[ -n "${CREDFS_MOUNTPOINT:-}" ] || die "CREDFS_MOUNTPOINT is not set (where to mount it)"
[ -d "$CREDFS_SOURCE" ] || die "CREDFS_SOURCE=$CREDFS_SOURCE: not a directory"
if [ ! -e "$CREDFS_MOUNTPOINT" ]; then
    mkdir -p -- "$CREDFS_MOUNTPOINT" || die "CREDFS_MOUNTPOINT=$CREDFS_MOUNTPOINT: cannot create it"
fi
[ -d "$CREDFS_MOUNTPOINT" ] || die "CREDFS_MOUNTPOINT=$CREDFS_MOUNTPOINT: not a directory"
[ -c /dev/fuse ] || die "/dev/fuse is missing: run the container with the device /dev/fuse"

creds=${CREDFS_CREDS:-caller}
case $creds in
    caller | mounter) ;;
    *) die "CREDFS_CREDS=$creds: must be caller or mounter" ;;
esac

set -- mount "$CREDFS_SOURCE" "$CREDFS_MOUNTPOINT" --foreground --creds "$creds"
if [ -n "${CREDFS_UID_MAP:-}" ]; then
    map_ok "$CREDFS_UID_MAP" || die "CREDFS_UID_MAP=$CREDFS_UID_MAP: expected MOUNT_ID:BACKING_ID:COUNT[,...]"
    set -- "$@" --uid-map "$CREDFS_UID_MAP"
fi
if [ -n "${CREDFS_GID_MAP:-}" ]; then
    map_ok "$CREDFS_GID_MAP" || die "CREDFS_GID_MAP=$CREDFS_GID_MAP: expected MOUNT_ID:BACKING_ID:COUNT[,...]"
    set -- "$@" --gid-map "$CREDFS_GID_MAP"
fi
if [ -n "${CREDFS_POLICY:-}" ]; then
    if [ ! -f "$CREDFS_POLICY" ] || [ ! -r "$CREDFS_POLICY" ]; then
        die "CREDFS_POLICY=$CREDFS_POLICY: not a readable file"
    fi
    set -- "$@" --policy "$CREDFS_POLICY"
fi
if [ -n "${CREDFS_OPTIONS:-}" ]; then
    set -- "$@" -o "$CREDFS_OPTIONS"
fi
if [ -n "${CREDFS_CACHE:-}" ]; then
    case $CREDFS_CACHE in
        none | auto | always) set -- "$@" --cache "$CREDFS_CACHE" ;;
        *) die "CREDFS_CACHE=$CREDFS_CACHE: must be none, auto or always" ;;
    esac
fi
if [ -n "${CREDFS_MISSING_GROUPS:-}" ]; then
    case $CREDFS_MISSING_GROUPS in
        deny | nss) set -- "$@" --missing-groups "$CREDFS_MISSING_GROUPS" ;;
        *) die "CREDFS_MISSING_GROUPS=$CREDFS_MISSING_GROUPS: must be deny or nss" ;;
    esac
fi
set -- "$@" --log-level "${CREDFS_LOG_LEVEL:-INFO}"

# CREDFS_COMMAND may be several words (an interpreter and a module): split on
# purpose, without globbing.
set -f
# shellcheck disable=SC2086
exec ${CREDFS_COMMAND:-credfs} "$@"
