"""The pieces of benchmarks/compare.py, one concern a module.

sysutil     bounded commands, mountinfo, loop devices, processes, CPU time
cleanup     the clean-up stack, signals, and sweeping a crashed run's leftovers
ramdisk     tmpfs -> image file -> loop device -> journaled ext4
candidates  native, credfs (each mode), mergerfs, bindfs: start, CPU, pause, stop
agents      forked processes running as benchmark uids
fileops     what the agents do (the timed loops)
workloads   the workloads: directories, cache drops, fio, owner checks
report      medians, ratios, the tables, CSV/JSON, machine facts
"""


class BenchError(Exception):
    """A failure with a one-line explanation for the user."""
