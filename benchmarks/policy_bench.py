"""How long a policy decision takes, next to the FUSE round trip it rides on.

Run on demand (as root):  .venv/bin/python benchmarks/policy_bench.py [--rules 300]

1. In process: decisions per second of a generated policy with N rules (a mix
   of literal and wildcard first segments, identities, placeholders, object
   conditions), for distinct paths (nothing cached: every decision walks the
   rules) and for repeated ones (the per-policy decision cache).
2. Through a real mount: stat() of a file (cache none: every stat is a FUSE
   round trip) without a policy and with the same policy, in the same run.
Prints numbers and ratios; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from credfs.policy import CallerFacts, ObjectFacts, parse_policy


def generate(rules: int) -> str:
    out = ["version = 1", "[defaults]", 'action = "allow"', "",
           "[identities.staff]", "gids = [3001]", "[identities.range]",
           'uids = ["2000-2999"]', ""]
    for i in range(rules):
        kind = i % 5
        out.append("[[rule]]")
        if kind == 0:
            out.append(f'path = "area{i}/private/{{uid}}/**"')
        elif kind == 1:
            out += [f'path = "area{i}/shared/**"', 'who = "staff"', 'creds = "mounter"']
        elif kind == 2:
            out += [f'path = ["area{i}/*.tmp", "area{i}/**/*.bak"]', 'action = "deny"',
                    'errno = "ENOENT"']
        elif kind == 3:
            out += [f'path = "**/secret{i}"', 'action = "deny"', 'errno = "EACCES"',
                    'who = "range"']
        else:
            out += [f'path = "area{i}/**"', 'type = "dir"', 'ops = ["lookup", "list"]']
        out.append("")
    return "\n".join(out)


def in_process(rules: int) -> tuple[float, float]:
    text = generate(rules)
    policy = parse_policy("bench.toml", text)
    caller = policy.caller(2001, 2001, (2001, 3001))
    obj = ObjectFacts(False, None)
    n = 20000
    paths = [f"area{(i * 7) % rules}/sub{i}/file{i}.txt" for i in range(n)]
    t0 = time.perf_counter()
    for p in paths:
        policy.decide("read", p, caller, obj)
    uncached = (time.perf_counter() - t0) / n
    t0 = time.perf_counter()
    for _ in range(5):
        for p in paths[:1000]:
            policy.decide("read", p, caller, obj)
    cached = (time.perf_counter() - t0) / 5000
    assert isinstance(caller, CallerFacts)
    return uncached, cached


def stat_loop(path: str, seconds: float = 2.0) -> float:
    n = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        os.stat(path)
        n += 1
    return (time.perf_counter() - t0) / n


def through_mount(rules: int) -> tuple[float, float, float]:
    work = tempfile.mkdtemp(prefix="credfs-policy-bench-")
    src, mnt = os.path.join(work, "src"), os.path.join(work, "mnt")
    os.makedirs(os.path.join(src, "area1", "sub"))
    os.mkdir(mnt)
    target = os.path.join("area1", "sub", "f")
    with open(os.path.join(src, target), "w") as f:
        f.write("x")
    policy_file = os.path.join(work, "p.toml")
    with open(policy_file, "w") as f:
        f.write(generate(rules))
    results = []
    try:
        native = stat_loop(os.path.join(src, target))
        for extra in ([], ["--policy", policy_file]):
            proc = subprocess.Popen([sys.executable, "-m", "credfs", "mount", src, mnt,
                                     "--foreground", "--cache", "none", *extra],
                                    stderr=subprocess.DEVNULL)
            try:
                deadline = time.monotonic() + 15
                while not os.path.ismount(mnt):
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise RuntimeError("credfs did not mount")
                    time.sleep(0.05)
                results.append(stat_loop(os.path.join(mnt, target)))
            finally:
                subprocess.run(["umount", "-l", mnt], check=False, capture_output=True)
                proc.terminate()
                proc.wait(timeout=10)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return native, results[0], results[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rules", type=int, default=300)
    args = ap.parse_args()
    uncached, cached = in_process(args.rules)
    print(f"policy of {args.rules} rules, in process:")
    print(f"  decision, nothing cached:   {uncached * 1e6:8.1f} us")
    print(f"  decision, cached:           {cached * 1e6:8.1f} us")
    if os.geteuid() != 0:
        print("(not root: skipping the mount measurement)")
        return
    native, plain, with_policy = through_mount(args.rules)
    print("stat() of a file, --cache none (lookup + getattr round trips per stat):")
    print(f"  native:                     {native * 1e6:8.1f} us")
    print(f"  credfs, no policy:          {plain * 1e6:8.1f} us  ({plain / native:.0f}x native)")
    print(f"  credfs, {args.rules}-rule policy:   {with_policy * 1e6:8.1f} us  "
          f"({with_policy / plain:.2f}x no policy)")
    print(f"  uncached decision / stat without policy: {uncached / plain:.1%}")


if __name__ == "__main__":
    main()
