"""The GPU machine's first-contact script, dry-run on CPU: a typo there would cost a slice of GPU time."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_runs_every_step_and_summarizes(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "WHEELS": str(tmp_path / "no-wheels"),
           "CORPUS": str(ROOT / "tests" / "data" / "sample"), "WORK": str(tmp_path / "work")}
    result = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), str(out), "--dry-run"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = (out / "summary.txt").read_text()
    for step in ("prepare", "cold", "warm", "tests", "attention", "fits"):
        assert f"{step:<10} rc=0 " in summary, summary
    for run in ("cold", "warm"):
        assert f"{run}.log: val_bpb " in summary and "overhead " in summary, summary
    # the fits under memory caps (uncapped on a CPU): each run's device batch and figures, one row a cap
    fits = [line.split() for line in summary.splitlines() if re.match(r" +(48|32|24) +4 x 2 +- ", line)]
    assert [row[0] for row in fits] == ["48", "32", "24"] and all(row[-3] == "ok" for row in fits), summary
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["env.txt", "prepare.log", "cold.log", "warm.log", "summary.txt", "tests.log", "attention.txt"])
    assert "fastest exact candidate, window" in (out / "attention.txt").read_text()
    assert "passed" in (out / "tests.log").read_text()


def test_the_pipeline_bench_runs_a_short_night_and_prints_its_figures():
    """bench_pipeline.py's stand-in must still be what the driver accepts (it is scored by the
    driver): a night of one idea prints its row."""
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_pipeline.py"), "--modes", "pipeline-1",
                             "--experiments", "1", "--run-s", "0.5", "--llm-s", "0.1", "--mix", "0.2,0.5,0.3"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    row = result.stdout.strip().splitlines()[-1].split()
    assert row[:3] == ["pipeline-1", "1", "1"], result.stdout  # mode, slots, one idea decided
    assert "20% gains, 50% neutral, 30% harmful" in result.stdout
