#!/usr/bin/env python3
"""File I/O inside a Box on a named QCOW2 volume, on the Box's root disk and on virtiofs host
shares (cache=never, boxlite's default, and cache=auto), next to the same on the host.

The same static program (bench/iobench.c, built here with gcc -static) runs on both sides:
sequential write (1 MiB blocks + fsync) and read (cached pages dropped first), 4 KiB random
writes (+ fsync) and reads, and untarring this repository's source tree (`git archive HEAD`).
Prints a Markdown table. Two Boxes boot (TCG here: the guest CPU is the bottleneck).

Usage: bench/volumes.py [--size MIB] [--ops N] [--runs N]
       (needs a built boxlite: target/release or target/debug, target/assets, gcc, git)
"""
import json, os, statistics, subprocess, sys, tarfile, tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def arg(name, default):
    return int(sys.argv[sys.argv.index(name) + 1]) if name in sys.argv else default


SIZE_MIB, OPS, RUNS = arg("--size", 256), arg("--ops", 2000), arg("--runs", 1)


def boxlite_binary():
    for profile in ("release", "debug"):
        path = os.path.join(ROOT, "target", profile, "boxlite")
        if os.path.exists(path):
            return path
    sys.exit("build boxlite first (cargo build --release)")


BIN = boxlite_binary()


def run(args, env=None, **kw):
    return subprocess.run(args, env=env, check=True, stdout=subprocess.PIPE, text=True, **kw).stdout


def parse(line):
    fields = dict(item.split("=") for item in line.split())
    return float(fields["secs"]), int(fields["bytes"]), int(fields["ops"])


def measure(sh, iobench, tar, folder):
    """Runs the five measurements in `folder` through `sh` (a function running a shell script
    on the host or in a Box); returns {column: value}."""
    f, d = f"{folder}/iobench.dat", f"{folder}/untar"
    script = (f"set -e; {iobench} seqwrite {f} {SIZE_MIB}; {iobench} seqread {f}; "
              f"{iobench} randwrite {f} {OPS}; {iobench} randread {f} {OPS}; rm -f {f}; "
              f"mkdir -p {d}; {iobench} exec tar -xf {tar} -C {d}; rm -rf {d}")
    samples = [[parse(l) for l in sh(script).strip().splitlines()] for _ in range(RUNS)]

    def median(i, value):
        return statistics.median(value(s[i]) for s in samples)

    mb = lambda r: r[1] / r[0] / 1e6
    iops = lambda r: r[2] / r[0]
    return {
        "seq write MB/s": median(0, mb),
        "seq read MB/s": median(1, mb),
        "rand write 4K IOPS": median(2, iops),
        "rand read 4K IOPS": median(3, iops),
        "untar s": median(4, lambda r: r[0]),
    }


def main():
    work = tempfile.mkdtemp(prefix="blvolbench", dir="/var/tmp")
    home, tools = os.path.join(work, "home"), os.path.join(work, "tools")
    os.makedirs(tools)
    env = dict(os.environ, BOXLITE_HOME=home, BOXLITE_ACCEL=os.environ.get("BOXLITE_ACCEL", "tcg"))
    run(["gcc", "-O2", "-static", "-o", os.path.join(tools, "iobench"),
         os.path.join(ROOT, "bench", "iobench.c")])
    tar = os.path.join(tools, "src.tar")
    with open(tar, "wb") as out:
        subprocess.run(["git", "-C", ROOT, "archive", "--format=tar", "HEAD"], stdout=out, check=True)
    with tarfile.open(tar) as t:
        members = t.getmembers()
    tree = f"{len(members)} entries, {sum(m.size for m in members) / 1e6:.1f} MB"

    layout = os.path.join(work, "layout")
    run(["bash", os.path.join(ROOT, "scripts/make-busybox-image.sh"), layout])
    img = "localhost/busybox:volbench"
    run([BIN, "image", "import", layout, "--tag", img], env)
    run([BIN, "volume", "create", "bench", "--size", "4G"], env)

    rows = []
    host_dir = os.path.join(work, "host")
    os.makedirs(host_dir)
    host_sh = lambda script: run(["sh", "-c", script])
    rows.append(("host folder (same disk as the shares)",
                 measure(host_sh, os.path.join(tools, "iobench"), tar, host_dir)))

    for cache in ("never", "auto"):
        share = os.path.join(work, f"share-{cache}")
        os.makedirs(share)
        name = f"volbench-{cache}"
        args = [BIN, "run", "-d", "--name", name, "--memory", "1024",
                "-v", f"{share}:/share", "-v", f"{tools}:/tools:ro"]
        if cache == "never":
            args += ["-v", "bench:/vol"]
        run(args + [img, "sleep", "100000"], dict(env, BOXLITE_SHARE_CACHE=cache))
        guest_sh = lambda script, name=name: run([BIN, "exec", name, "sh", "-c", script], env)
        try:
            if cache == "never":
                rows.append(("Box: named volume (qcow2, virtio-blk)",
                             measure(guest_sh, "/tools/iobench", "/tools/src.tar", "/vol")))
                rows.append(("Box: root disk (qcow2 overlay)",
                             measure(guest_sh, "/tools/iobench", "/tools/src.tar", "/root")))
            label = "boxlite's default" if cache == "never" else "opt-in: BOXLITE_SHARE_CACHE=auto"
            rows.append((f"Box: virtiofs share, cache={cache} ({label})",
                         measure(guest_sh, "/tools/iobench", "/tools/src.tar", "/share")))
        finally:
            run([BIN, "rm", "-f", name], env)

    columns = list(rows[0][1])
    print(f"\nboxlite volume bench: {SIZE_MIB} MiB sequential, {OPS} random 4 KiB ops, untar of "
          f"this repository ({tree}); median of {RUNS} run(s); accel {env['BOXLITE_ACCEL']}; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs\n")
    print("| where | " + " | ".join(columns) + " |")
    print("|---|" + "---:|" * len(columns))
    for label, values in rows:
        cells = [f"{values[c]:.2f}" if c == "untar s" else f"{values[c]:.0f}" for c in columns]
        print(f"| {label} | " + " | ".join(cells) + " |")
    run([BIN, "volume", "rm", "bench"], env)
    subprocess.run(["rm", "-rf", work])


if __name__ == "__main__":
    main()
