"""
The night's page at size: a synthetic night of N experiments (default 500; four slots, repeats,
crashes, diffs, loss curves, lessons), written as the driver writes it, then opened in headless
Chromium. Prints the time to write the page, its size, and the browser's time from navigation to
the page's script done and to the load event (median of --loads). Asserts nothing.

Usage: python bench/bench_report.py [--experiments 500] [--loads 3] [--screenshot PATH] [--keep DIR]
       (needs Debian's chromium and chromium-driver for the browser figures, and selenium)
"""

import argparse
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from autoresearch import page, records  # noqa: E402
from autoresearch.records import Best, Night  # noqa: E402

THEMES = ["optimizer", "architecture", "attention", "schedule", "data", "regularization"]


def synthetic_night(run_dir, tsv, n, seed=0):
    """A night of n experiments after the baseline, recorded as the driver records one."""
    rng = random.Random(seed)
    run_dir.mkdir(parents=True)
    best, best_commit, sigma, clock, lines, finished = 1.0, "b" * 40, 0.0012, 1.7e9, [], []
    slot_free = {f"gpu{i}": clock for i in range(4)}
    notes = ["# Research notebook", ""]
    for k in range(n + 1):
        kind = "baseline" if k == 0 else "candidate"
        commit = f"{k:07x}" + "c" * 33
        outcome = "keep" if k == 0 else rng.choices(["keep", "discard", "crash"], [0.12, 0.78, 0.10])[0]
        true = best - rng.uniform(0.0003, 0.0015) if outcome == "keep" else best + rng.uniform(-0.0008, 0.006)
        n_runs = 3 if k == 0 or rng.random() < 0.15 else 1
        runs = []
        for r in range(n_runs):
            slot = min(slot_free, key=slot_free.get)
            seconds = rng.uniform(330, 370)
            start = slot_free[slot]
            slot_free[slot] = start + seconds + rng.uniform(1, 20)
            val = None if outcome == "crash" else round(true + rng.gauss(0, sigma), 6)
            curve = [[s, 9.0 * (s + 10) ** -0.35 + (val or 1.0)] for s in range(0, 950, 7)]
            runs.append({"role": "candidate" if r == 0 else "noise" if k == 0 else "candidate", "seed": 42 + r,
                         "attempt": 0, "val_bpb": val, "seconds": round(seconds, 1),
                         "failure": "" if val else "no val_bpb: train.py exited with code 1 before its model was scored",
                         "device_batch": 128, "note": "", "log": f"{k:04d}/train.log", "curve": curve[:page.CURVE_POINTS]})
            if val is None:
                runs[-1]["tail"] = "Traceback (most recent call last):\n  ...\ntorch.OutOfMemoryError: CUDA out of memory.\n"
            finished.append({"n": k, "role": runs[-1]["role"], "seed": 42 + r, "slot": slot, "ended": start + seconds,
                             "seconds": round(seconds, 1), "val_bpb": val, "device_batch": 128, "note": ""})
        vals = [r["val_bpb"] for r in runs if r["val_bpb"] is not None]
        mean = sum(vals) / len(vals) if vals else None
        status = outcome if k else "keep"
        description = "baseline" if k == 0 else f"idea {k}: {rng.choice(THEMES)} change number {k} with some words"
        rows = [records.format_row(commit, r["val_bpb"], 45000.0, status if r["val_bpb"] else "crash",
                                   description if i == 0 else f"repeat {i + 1}/3 (seed {r['seed']}): {description}")
                for i, r in enumerate(runs)]
        lines += rows
        diff = "".join(f"@@ -{40 + j},3 +{40 + j},3 @@\n context line\n-OLD_VALUE_{j} = 0.1\n+NEW_VALUE_{j} = 0.2\n"
                       for j in range(rng.randint(1, 12)))
        record = {"n": k, "kind": kind, "description": description, "fix_description": "",
                  "hypothesis": "" if k == 0 else "a reason it should help, in one line of moderate length",
                  "theme": "baseline" if k == 0 else rng.choice(THEMES), "status": status, "note": "",
                  "rows": rows, "commit": commit, "parent": best_commit, "mean": mean,
                  "delta": None if mean is None or k == 0 else mean - best,
                  "delta_sigma": None if mean is None or k == 0 else (mean - best) / sigma, "sigma": sigma,
                  "decision": f"{status}: synthetic", "usd": round(rng.uniform(0.01, 0.08), 4),
                  "decided": clock, "runs": runs, "diff": "" if k == 0 else diff,
                  "lesson": "" if k == 0 else "a lesson the model wrote about it"}
        (run_dir / f"{k:04d}").mkdir()
        records.save_json(run_dir / f"{k:04d}" / "experiment.json", record)
        notes.append(f"- #{k} {status}: {description}. Lesson: a lesson.")
        if status == "keep" and mean is not None:
            best, best_commit = mean, commit
    wall = max(slot_free.values()) - clock
    night = Night(tag="synthetic", branch="autoresearch/synthetic", started="2026-12-01 22:00", settings={},
                  metric_hashes={}, best=Best(best_commit, "best"), groups={best_commit: [best]}, sigma=sigma,
                  rows=lines, next_n=n + 1, next_seed=99, tried=[], gpu_s={"total": wall * 4 * 0.95, "noise": wall * 0.4},
                  run_counts={"total": len(finished), "noise": len(finished) - n - 1}, wins_rejected=3,
                  spend={"usd": 12.34, "input": 4_000_000, "output": 300_000}, in_flight=[], sandbox="bubblewrap",
                  slot_seconds={s: wall * 0.95 for s in slot_free}, wall_s=wall, done=n + 1, finished=finished)
    records.save_night(run_dir / "journal.json", night)
    (run_dir / "notes.md").write_text("\n".join(notes) + "\n")
    tsv.write_text(records.TSV_HEADER + "".join(lines))


def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--experiments", type=int, default=500)
    parser.add_argument("--loads", type=int, default=3)
    parser.add_argument("--screenshot", default=None, help="save a screenshot of the page here (PNG)")
    parser.add_argument("--keep", default=None, help="build the night in this folder (kept) instead of a temporary one")
    args = parser.parse_args()
    root = Path(args.keep or tempfile.mkdtemp(prefix="autoresearch-page-"))
    run_dir, tsv = root / "runs" / "synthetic", root / "results.tsv"
    synthetic_night(run_dir, tsv, args.experiments)
    writes = []
    for _ in range(3):
        start = time.perf_counter()
        html = page.write(run_dir, tsv)
        writes.append(time.perf_counter() - start)
    print(f"synthetic night: {args.experiments} experiments, {len(tsv.read_text().splitlines()) - 1} runs")
    print(f"page written in {statistics.median(writes) * 1000:.0f} ms (median of 3), {html.stat().st_size / 2**20:.2f} MiB")
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        print("no chromium / chromedriver here: no browser figures")
        return
    driver = browser()
    try:
        script, loaded = [], []
        for _ in range(args.loads):
            driver.get(html.as_uri())
            for _ in range(200):
                done = driver.execute_script("return window.pageRendered")
                if done is not None:
                    break
                time.sleep(0.05)
            script.append(done)
            loaded.append(driver.execute_script(
                "const t = performance.getEntriesByType('navigation')[0]; return t.loadEventEnd - t.startTime"))
        rows = driver.execute_script("return document.querySelectorAll('#exps tbody tr.exp').length")
        print(f"browser (headless Chromium): script done {statistics.median(script):.0f} ms after navigation start, "
              f"load event {statistics.median(loaded):.0f} ms (median of {args.loads}); {rows} rows")
        if args.screenshot:
            driver.execute_script("document.getElementById('exp-%d').click(); window.scrollTo(0, 0)" % min(7, args.experiments))
            driver.set_window_size(1400, 1700)
            driver.save_screenshot(args.screenshot)
            print(f"screenshot: {args.screenshot}")
    finally:
        driver.quit()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
