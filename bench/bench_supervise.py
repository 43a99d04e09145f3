"""What the supervisor (autoresearch/supervise.py, every run's parent) costs: the start-up it
adds to a run (a process that exits at once, with and without it), and the CPU it uses while a
run goes on (its counts of processes every 0.1 s and of bytes on disk every second), beside a
run of N busy processes with a run folder of M files, as a compile cache would leave.

Usage: python bench/bench_supervise.py [--seconds 10] [--processes 40] [--files 5000]
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from autoresearch import training  # noqa: E402


def supervised(argv, folder):
    limits = training.Limits()
    return training.supervised(argv, limits, Path(folder) / "report", [Path(folder) / "w"], Path(folder) / "log")


def children_cpu_s():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def start_up_s(argv, repeats):
    """Median wall time of argv, run `repeats` times."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="length of the supervised run")
    parser.add_argument("--processes", type=int, default=40, help="processes the run keeps (sleeping)")
    parser.add_argument("--files", type=int, default=5000, help="files in its run folder")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "w").mkdir()
        for i in range(args.files):
            (Path(folder) / "w" / f"f{i}").write_bytes(b"x" * 100)
        bare = [sys.executable, "-c", "pass"]
        plain, wrapped = start_up_s(bare, 15), start_up_s(supervised(bare, folder), 15)
        print(f"start-up: python -c pass {plain * 1000:.0f} ms, under the supervisor {wrapped * 1000:.0f} ms "
              f"(+{(wrapped - plain) * 1000:.0f} ms per run)")
        run = ("import subprocess, sys, time\n"
               f"ps = [subprocess.Popen([sys.executable, '-c', 'import time; time.sleep({args.seconds + 5})']) "
               f"for _ in range({args.processes})]\n"
               f"time.sleep({args.seconds})\n"
               "[p.kill() for p in ps]")
        argv = supervised([sys.executable, "-c", run], folder)
        config = json.loads(argv[2])
        before = children_cpu_s()
        start = time.perf_counter()
        proc = subprocess.Popen(argv)
        supervisor = proc.pid
        cpu_ticks = os.sysconf("SC_CLK_TCK")
        last = 0.0
        while proc.poll() is None:  # the supervisor's own CPU, read while it lives
            fields = Path(f"/proc/{supervisor}/stat").read_text().rsplit(")", 1)[1].split()
            last = (int(fields[11]) + int(fields[12])) / cpu_ticks
            time.sleep(0.2)
        wall = time.perf_counter() - start
        print(f"a {wall:.1f} s run of {args.processes} processes, {args.files} files in its folder: the supervisor "
              f"used {last:.2f} s of CPU ({100 * last / wall:.1f}% of one core); limits {config['processes']} "
              f"processes, {config['written'] >> 30} GiB written; all children's CPU {children_cpu_s() - before:.2f} s")


if __name__ == "__main__":
    main()
