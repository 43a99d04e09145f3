"""
Train train.py at its defaults as on smaller GPUs: each run's process is capped at CAP GiB of GPU
memory (torch.cuda.set_per_process_memory_fraction; the fit reads the cap as the GPU's free
memory). Prints, per cap, the device batch the fit chose, its estimate, the real peak, tokens per
second, and whether the run ran out of memory or went past its cap. Asserts nothing.

Usage: python bench/fit_caps.py [CAP_GIB ...]   (default 48 32 24; on a GPU machine)
       Short runs: set AUTORESEARCH_TIME_BUDGET (e.g. 15) and AUTORESEARCH_EVAL_TOKENS. On a CPU
       the runs are uncapped (a smoke run of the parsing, with small settings).
"""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN = Path(os.environ.get("TRAIN_PY", ROOT / "train.py"))  # (the GPU check's dry run passes a small one)
CAPPED = """
import runpy, sys, torch
cap = float(sys.argv[1]) * 2**30
if torch.cuda.is_available():
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap / torch.cuda.get_device_properties(0).total_memory))
sys.argv = [sys.argv[2]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run(cap_gib):
    """One capped run: its figures as a dict (the log's tail when it has no summary)."""
    result = subprocess.run([sys.executable, "-c", CAPPED, str(cap_gib), str(TRAIN)], cwd=TRAIN.parent,
                            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    out = result.stdout + result.stderr
    fit = re.search(r"^fit: .*?device batch (\d+) rows(?:, estimated peak ([\d.]+) GiB)?.*?(\d+) accumulation", out, re.M)
    summary = dict(re.findall(r"^(\w+):\s+(\S+)$", out.split("\n---\n")[-1], re.M)) if "\n---\n" in out else {}
    figures = {"cap": cap_gib, "rows": fit[1] if fit else "-", "steps": fit[3] if fit else "-",
               "estimate": f"{float(fit[2]):.1f}" if fit and fit[2] else "-", "oom": "OutOfMemoryError" in out or "out of memory" in out}
    if summary:
        figures.update(peak=float(summary["peak_vram_mb"]) / 1024, tokens=float(summary["tokens_per_sec"]),
                       val_bpb=summary["val_bpb"])
    else:
        figures["tail"] = " | ".join(out.replace("\r", "\n").strip().splitlines()[-3:])[-300:]
    return figures


def main():
    caps = [float(a) for a in sys.argv[1:]] or [48.0, 32.0, 24.0]
    print(f"{'cap GiB':>8} {'device batch':>13} {'estimate GiB':>13} {'peak GiB':>9} {'tokens/s':>11}  result")
    for cap in caps:
        f = run(cap)
        if "peak" in f:
            verdict = "ok" if f["peak"] <= cap else "over its cap"
            print(f"{cap:8.0f} {f['rows'] + ' x ' + f['steps']:>13} {f['estimate']:>13} {f['peak']:9.1f} "
                  f"{f['tokens']:11,.0f}  {verdict} (val_bpb {f['val_bpb']})", flush=True)
        else:
            why = "out of memory" if f["oom"] else "no summary"
            print(f"{cap:8.0f} {f['rows'] + ' x ' + f['steps']:>13} {f['estimate']:>13} {'-':>9} {'-':>11}  "
                  f"{why}: {f['tail']}", flush=True)


if __name__ == "__main__":
    main()
