"""Timing and measurement helpers for the benchmarks: child processes timed with their peak RSS
and CPU shares, the page cache (warming, residency, dirty-page threshold, writeback), the cost of
fresh memory, and the state of the nemoq code that was timed.

Not part of the test suite. Uses only what the venv already has.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def warm(paths: list[Path]) -> float:
    """Read every file through the page cache; returns the seconds the read took."""
    start = time.perf_counter()
    buf = bytearray(16 * 1024 * 1024)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    return time.perf_counter() - start


def resident_fraction(paths: list[Path]) -> float:
    """Share of the files' bytes in the page cache (util-linux fincore), or NaN without it."""
    fincore = shutil.which("fincore")
    if not fincore:
        return float("nan")
    out = subprocess.run([fincore, "--bytes", "--noheadings", "--raw", "--output", "RES,SIZE", *map(str, paths)],
                         capture_output=True, text=True)
    if out.returncode:
        return float("nan")
    res = size = 0
    for line in out.stdout.split("\n"):
        if line.strip():
            r, s = line.split()[:2]
            res, size = res + int(r), size + int(s)
    return min(1.0, res / size) if size else float("nan")  # fincore rounds up to whole pages


def dirty_threshold() -> int:
    """Bytes of dirty page cache the kernel allows before it throttles writers (0 if unknown).

    A copy larger than this runs at the disk's speed, not at memory speed."""
    try:
        with open("/proc/vmstat") as f:
            pages = next(int(line.split()[1]) for line in f if line.startswith("nr_dirty_threshold "))
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, StopIteration, ValueError):
        return 0


def first_touch_rate(nbytes: int = 1 << 30) -> tuple[float, float]:
    """GB/s of writing memory never touched before, and of writing it again.

    On a VM whose freed memory goes back to the host (Firecracker with free page reporting or a
    balloon), every new page is a host page fault: writing new page cache (cp's copy, a GGUF)
    then runs at the first figure, whatever the disk."""
    a = np.empty(nbytes, np.uint8)
    start = time.perf_counter()
    a.fill(1)
    first = time.perf_counter() - start
    start = time.perf_counter()
    a.fill(2)
    again = time.perf_counter() - start
    del a
    return nbytes / first / 1e9, nbytes / again / 1e9


def cpu_times() -> list[int]:
    """The aggregate `cpu` line of /proc/stat: user nice system idle iowait irq softirq steal ..."""
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1:]]


def spawn_timed(argv: list[str], log: Path) -> tuple[float, int, int, dict]:
    """Run argv (stdout and stderr to `log`); wall seconds, peak RSS in bytes, exit code, CPU shares.

    Peak RSS comes from /usr/bin/time's %M where it exists: a child's ru_maxrss from os.wait4
    starts at the RSS of the process it was forked from (Linux keeps the high-water mark across
    exec), so measured directly from this Python process it could never read below our own RSS.
    """
    time_bin = Path("/usr/bin/time")
    rss_file = log.with_suffix(".rss")
    if time_bin.exists():
        argv = [str(time_bin), "-f", "%M", "-o", str(rss_file), *argv]
    actions = [(os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
               (os.POSIX_SPAWN_OPEN, 1, str(log), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644),
               (os.POSIX_SPAWN_DUP2, 1, 2)]
    cpu0 = cpu_times()
    start = time.perf_counter()
    pid = os.posix_spawnp(argv[0], argv, os.environ, file_actions=actions)
    _, status, usage = os.wait4(pid, 0)
    seconds = time.perf_counter() - start
    delta = [b - a for a, b in zip(cpu0, cpu_times())]
    total = sum(delta[:8]) or 1
    busy = (delta[0] + delta[1] + delta[2] + delta[5] + delta[6]) / total
    child_cores = (usage.ru_utime + usage.ru_stime) / seconds
    # busy/iowait/steal: shares of all cores' time over the run; child: cores the timed command
    # used on average; others: cores everything else used (kernel writeback, other users' jobs)
    cpu = {"busy": round(busy, 3), "iowait": round(delta[4] / total, 3), "steal": round(delta[7] / total, 3),
           "child_cores": round(child_cores, 2),
           "other_cores": round(max(0.0, busy * (os.cpu_count() or 1) - child_cores), 2)}
    rss = usage.ru_maxrss * 1024
    if time_bin.exists():
        try:  # time writes "Command exited with non-zero status N" before %M on failure
            rss = int(rss_file.read_text().split()[-1]) * 1024
        except (OSError, ValueError, IndexError):
            rss = 0
    return seconds, rss, os.waitstatus_to_exitcode(status), cpu


def clear(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def settle() -> None:
    """Flush dirty pages so the next run does not pay for the previous one's writeback."""
    os.sync()
    time.sleep(1.0)


def git_state() -> dict:
    """The nemoq code that was timed: HEAD and whether nemoq/ had uncommitted changes."""
    def git(*a: str) -> str:
        r = subprocess.run(["git", "-C", str(ROOT), *a], capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else "?"
    return {"head": git("rev-parse", "--short", "HEAD"), "subject": git("log", "-1", "--format=%s"),
            "nemoq_dirty": bool(git("status", "--porcelain", "--", "nemoq"))}
