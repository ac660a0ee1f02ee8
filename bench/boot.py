#!/usr/bin/env python3
"""Boot and exec latency of boxlite next to the floor, plus idle memory per Box.

Prints a table:
  - floor: QEMU booting the same kernel + initramfs whose agent powers off at once (probe mode),
  - boxlite run: from `boxlite run --rm IMG echo x` to the first byte of its output,
  - exec round-trip: `boxlite exec BOX true` on a running Box,
  - RSS of one idle Box (QEMU + shim) and how many idle 128 MiB Boxes fit in MemAvailable.
Usage: bench/boot.py [--runs N]   (needs target/release/boxlite and target/assets; see README)
"""
import json, os, statistics, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "boxlite")
ASSETS = os.path.join(ROOT, "target", "assets")
RUNS = int(sys.argv[sys.argv.index("--runs") + 1]) if "--runs" in sys.argv else 10


def floor_once():
    console = tempfile.mktemp()
    args = ["qemu-system-x86_64", "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
            "-M", "q35", "-bios", "/usr/share/qemu/qboot.rom", "-accel", "tcg,thread=multi",
            "-cpu", "max", "-smp", "1", "-m", "512",
            "-kernel", os.path.join(ASSETS, "vmlinux"), "-initrd", os.path.join(ASSETS, "initramfs.img"),
            "-append", "console=ttyS0 panic=-1 quiet tsc_early_khz=2300000 boxlite.probe=1",
            "-serial", "file:" + console]
    t0 = time.monotonic()
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    elapsed = time.monotonic() - t0
    ok = "BOXLITE-PROBE-OK" in open(console, errors="replace").read()
    os.unlink(console)
    if not ok:
        sys.exit("floor guest did not print its marker")
    return elapsed


def first_byte(env, img):
    t0 = time.monotonic()
    p = subprocess.Popen([BIN, "run", "--rm", img, "echo", "x"], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL)
    p.stdout.read(1)
    t1 = time.monotonic() - t0
    p.stdout.read()
    p.wait()
    return t1


def rss_kib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def main():
    home = tempfile.mkdtemp(prefix="blbench")
    env = dict(os.environ, BOXLITE_HOME=home, BOXLITE_ACCEL="tcg", BOXLITE_ASSETS=ASSETS)
    layout = os.path.join(home, "layout")
    subprocess.run(["bash", os.path.join(ROOT, "scripts/make-busybox-image.sh"), layout], check=True,
                   stdout=subprocess.DEVNULL)
    img = "localhost/busybox:bench"
    subprocess.run([BIN, "image", "import", layout, "--tag", img], env=env, check=True,
                   stdout=subprocess.DEVNULL)

    floor = [floor_once() for _ in range(RUNS)]
    run = [first_byte(env, img) for _ in range(RUNS)]

    subprocess.run([BIN, "run", "-d", "--name", "idle", "--memory", "128", img, "sleep", "100000"],
                   env=env, check=True, stdout=subprocess.DEVNULL)
    execs = []
    for _ in range(RUNS):
        t0 = time.monotonic()
        subprocess.run([BIN, "exec", "idle", "true"], env=env, check=True)
        execs.append(time.monotonic() - t0)
    time.sleep(2)
    info = json.loads(subprocess.run([BIN, "inspect", "idle"], env=env, check=True,
                                     stdout=subprocess.PIPE).stdout)
    vmm_kib, shim_kib = rss_kib(info["vmm_pid"]), rss_kib(info["shim_pid"])
    subprocess.run([BIN, "rm", "-f", "idle"], env=env, check=True, stdout=subprocess.DEVNULL)
    avail = next(int(l.split()[1]) for l in open("/proc/meminfo") if l.startswith("MemAvailable:"))
    per_box = vmm_kib + shim_kib

    fl, rn, ex = statistics.median(floor), statistics.median(run), statistics.median(execs)
    print(f"| measure (median of {RUNS}, TCG) | seconds | ratio to floor |")
    print("|---|---|---|")
    print(f"| floor: QEMU boot to agent power-off | {fl:.3f} | 1.00 |")
    print(f"| boxlite run --rm: first output byte | {rn:.3f} | {rn / fl:.2f} |")
    print(f"| boxlite exec round-trip | {ex:.3f} | {ex / fl:.2f} |")
    print()
    print("| idle Box (128 MiB guest) | MiB |")
    print("|---|---|")
    print(f"| QEMU RSS | {vmm_kib / 1024:.1f} |")
    print(f"| shim RSS | {shim_kib / 1024:.1f} |")
    print(f"| idle Boxes that fit in MemAvailable ({avail / 1024 / 1024:.1f} GiB) | {avail // per_box} |")
    subprocess.run(["rm", "-rf", home])


if __name__ == "__main__":
    main()
