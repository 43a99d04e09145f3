"""
The pipeline against the sequential driver: a simulated night per mode, side by side in one run.
A fake LLM server answers after --llm-s seconds; a stand-in train.py "trains" for --run-s seconds
(the real ratio of 300 s of training to ~60 s of thinking, scaled down) and scores 1.0 plus the
true effects of the ideas in it plus seeded noise, so every keep can be judged. Prints, for the
sequential mode (--pipeline off), the pipeline on 1 slot and on 4 slots: experiments per hour
(over the whole night, and once under way: see steady_per_hour), the GPU duty cycle (share of
wall time each slot spent inside train.py), the driver's own time between two runs on a slot,
and the false-keep rate. Needs no GPU. Prints figures; asserts nothing.

A night is --hours long, scaled as the runs are (8 hours of 300-s runs: 16 minutes of 10-s runs),
the same for every mode, as a user's night is; or, with --experiments N, as long as N ideas take.

Usage: python bench/bench_pipeline.py [--run-s 10] [--llm-s 2] [--hours 2 | --experiments N] [--seed 0]
                                     [--modes sequential,pipeline-1,pipeline-4]
"""

import argparse
import contextlib
import io
import itertools
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from fake_anthropic import FakeAnthropic, edit  # noqa: E402
from autoresearch import cli, records  # noqa: E402

KNOBS = 40            # lines of the stand-in an idea may change, one each
NOISE_STD = 0.001     # val_bpb's spread between seeds of the same code
STANDIN = '''"""Stand-in train.py for bench_pipeline.py: sleeps, then scores 1.0 + the knobs + noise (drawn from
the seed and this file: any change, a neutral one too, moves a run as a change of code does)."""
import hashlib, os, random, time
import prepare
SLEEP_S = {run_s}
{knobs}
seed = int(os.environ["AUTORESEARCH_SEED"])
time.sleep(SLEEP_S)
effects = sum(v for k, v in globals().items() if k.startswith("KNOB_"))
code = hashlib.sha256(open(__file__, "rb").read()).hexdigest()
noise = {noise} * random.Random(f"{{seed}}:{{code}}").gauss(0, 1)
val_bpb = prepare.evaluate_bpb(prepare.ConstantModel(round(1.0 + effects + noise, 6)), None, 4)  # (scored by the driver)
print(f"---\\nval_bpb: {{val_bpb:.6f}}\\npeak_vram_mb: 0.0\\nseed: {{seed}}")
print(f"max_seq_len: {{prepare.MAX_SEQ_LEN}}\\ntime_budget: {{prepare.TIME_BUDGET}}\\neval_tokens: {{prepare.EVAL_TOKENS}}")
'''


def ideas(llm_s, seed=0, mix=(0.5, 0.35, 0.15)):
    """The scripted LLM: after llm_s seconds, sets one knob still at 0 in the train.py it is shown to
    a drawn true effect: `mix` the shares of real gains (0.5-4 sigma), neutral changes and harmful
    ones (0.5-3 sigma worse). The k-th
    idea's effect is drawn from (seed, k) alone, so every mode is given the same true effects in the
    same order, whatever it was shown (the knob is drawn from those still free). A request to
    condense the notebook (a long night) is answered with its headings and keeps."""
    truth, numbers = {}, itertools.count()

    def reply(request):
        time.sleep(llm_s)
        shown = request["messages"][0]["content"][0]["text"]
        if "tools" not in request:  # the notebook grew too long: condensed to its headings and keeps
            notes = shown.split("\n\n", 1)[1]
            return {"text": "\n".join(line for line in notes.splitlines() if line.startswith("#") or " keep " in line)}
        i = next(numbers)  # (replies run on several threads at once: each takes its own number)
        free = [int(k) for k in re.findall(r"^KNOB_(\d+) = 0\.0$", shown, re.M)]
        knob = random.Random(f"{seed}:{i}:knob").choice(free)  # (the knob sets the code, hence the noise)
        u, draw = random.Random(f"{seed}:{i}").random(), random.Random(f"{seed}:{i}:effect")
        effect = NOISE_STD * (draw.uniform(0.5, 4) if u < mix[0] else 0.0 if u < mix[0] + mix[1] else
                              -draw.uniform(0.5, 3))
        name = f"idea {i + 1}: knob {knob}"
        truth[name] = effect
        return edit(name, (f"KNOB_{knob:02d} = 0.0", f"KNOB_{knob:02d} = {effect:.6f}"))
    return reply, truth


class Decisions(io.StringIO):
    """The driver's output, noting when each experiment's status line (its decision) was written."""

    def __init__(self):
        super().__init__()
        self.times = []

    def write(self, text):
        if " | best " in text:
            self.times.append(time.time())
        return super().write(text)


def steady_per_hour(times):
    """Experiments per hour once a night is under way: the slope of decisions against time over the
    middle three quarters of them, leaving out the start and the night's last round of runs (which
    fills only some of the slots: a few seconds in a short simulated night, nothing in one of hours)."""
    lo, hi = len(times) // 8, len(times) - len(times) // 8
    if hi - lo < 2:
        return float("nan")  # (too short a night to tell)
    return statistics.linear_regression(times[lo:hi], range(lo, hi)).slope * 3600


def night_minutes(args):
    """The night's wall-clock minutes: --hours of 300-s runs, scaled to runs of --run-s."""
    return args.hours * args.run_s / 300 * 60


def night(mode, args):
    """One simulated night in a fresh repository; its figures."""
    work = Path(tempfile.mkdtemp(prefix=f"bench-pipeline-{mode}-"))
    repo, cache = work / "repo", work / "cache"
    repo.mkdir()
    cache.mkdir()
    (cache / "val.bin").write_bytes(b"val")
    (cache / "token_bytes.bin").write_bytes(b"bytes")
    shutil.copy(ROOT / "driver.py", repo)
    shutil.copytree(ROOT / "autoresearch", repo / "autoresearch", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "tests" / "standins" / "prepare.py", repo)
    knobs = "\n".join(f"KNOB_{k:02d} = 0.0" for k in range(KNOBS))
    (repo / "train.py").write_text(STANDIN.format(run_s=args.run_s, knobs=knobs, noise=NOISE_STD))
    (repo / "program.md").write_text("Lower val_bpb.\n")
    (repo / ".gitignore").write_text("results.tsv\nruns/\n__pycache__/\n")
    for command in (["init", "-q", "-b", "main"], ["add", "."], ["-c", "user.email=b@x", "-c", "user.name=b",
                                                                "commit", "-q", "-m", "stand-in"]):
        subprocess.run(["git", *command], cwd=repo, check=True)
    fake = FakeAnthropic()
    reply, truth = ideas(args.llm_s, args.seed, args.mix)
    fake.replies += [reply] * 100_000  # (a reply is only taken when asked for)
    os.environ.update(ANTHROPIC_BASE_URL=fake.url, ANTHROPIC_API_KEY="bench", AUTORESEARCH_CACHE=str(cache),
                      AUTORESEARCH_TIME_BUDGET="300")
    flags = {"sequential": ["--pipeline", "off"], "pipeline-1": [], "pipeline-4": ["--gpus", "0,1,2,3"]}[mode]
    length = ["--max-experiments", str(args.experiments)] if args.experiments is not None else \
        ["--deadline", f"{night_minutes(args):.6f}m"]
    cwd = os.getcwd()
    os.chdir(repo)
    try:  # the baseline first (its runs are not ideas), then the ideas: the figures are the second session's
        with contextlib.redirect_stdout(io.StringIO()):
            cli.main(["--tag", "b", "--allow-cpu", "--sandbox", "off", "--max-experiments", "0", *flags])
            before = json.loads((repo / "runs/b/journal.json").read_text())
        with contextlib.redirect_stdout(decisions := Decisions()):
            cli.main(["--tag", "b", "--allow-cpu", "--sandbox", "off", *length, *flags])
    finally:
        os.chdir(cwd)
        fake.close()
    st = json.loads((repo / "runs/b/journal.json").read_text())
    rows = records.read_tsv(repo / "results.tsv")
    kept = [r for r in rows if r["status"] == "keep" and r["description"].split(" [")[0] in truth]
    false_keeps = [r for r in kept if truth[r["description"].split(" [")[0]] >= 0]
    rebases = sum("which was no longer the best" in r["description"] for r in rows)  # (one row per move)
    wall, done = st["wall_s"] - before["wall_s"], st["done"] - before["done"]
    runs = len(rows) - len(before["rows"])
    busy = sum(st["slot_seconds"].values()) - sum(before["slot_seconds"].values())
    n_slots = flags[-1].count(",") + 1 if "--gpus" in flags else 1
    shutil.rmtree(work, ignore_errors=True)
    return {"experiments": done, "wall_s": wall, "per_hour": done / (wall / 3600), "duty": busy / n_slots / wall,
            "steady_per_hour": steady_per_hour(decisions.times),
            "slots": n_slots, "runs": runs, "gap_s": (wall * n_slots - busy) / max(runs, 1), "kept": len(kept),
            "false_keeps": len(false_keeps), "rebases": rebases}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--run-s", type=float, default=10.0, help="seconds a stand-in run trains (default 10)")
    parser.add_argument("--llm-s", type=float, default=2.0, help="seconds the fake LLM thinks (default 2)")
    parser.add_argument("--hours", type=float, default=2.0,
                        help="the night's length in hours of 300-s runs, scaled by --run-s (default 2: 4 minutes "
                             "of 10-s runs); every mode gets the same")
    parser.add_argument("--experiments", type=int, default=None,
                        help="instead of --hours: a night of this many ideas after the baseline")
    parser.add_argument("--seed", type=int, default=0, help="which night of ideas (default 0)")
    parser.add_argument("--modes", default="sequential,pipeline-1,pipeline-4",
                        help="which nights, comma-separated (default: all three)")
    parser.add_argument("--mix", default="0.5,0.35,0.15",
                        help="shares of real gains, neutral and harmful ideas (default 0.5,0.35,0.15; an early "
                             "night of a real search may look like 0.2,0.5,0.3)")
    args = parser.parse_args()
    try:
        args.mix = tuple(float(x) for x in args.mix.split(","))
        assert len(args.mix) == 3 and min(args.mix) >= 0 and abs(sum(args.mix) - 1) < 1e-6
    except (ValueError, AssertionError):
        parser.error(f"--mix {args.mix!r}: three shares that sum to 1, e.g. 0.2,0.5,0.3")
    if args.hours <= 0 or (args.experiments is not None and args.experiments < 1):
        parser.error("a night needs --hours above 0, or --experiments of at least 1")
    length = f"{args.experiments} ideas" if args.experiments is not None else \
        f"{args.hours:g} hours ({night_minutes(args):g} minutes at this scale)"
    print(f"stand-in runs of {args.run_s:g} s, LLM replies after {args.llm_s:g} s, a night of {length} after the "
          f"baseline (figures from the ideas' session only), night {args.seed}; noise-aware rule, sigma {NOISE_STD}; "
          f"ideas {args.mix[0]:.0%} gains, {args.mix[1]:.0%} neutral, {args.mix[2]:.0%} harmful")
    print(f"{'mode':>12} {'slots':>5} {'exp':>4} {'runs':>5} {'wall s':>7} {'exp/h':>7} {'steady':>7} {'duty':>6} "
          f"{'gap s/run':>9} {'kept':>5} {'false keeps':>11} {'moves':>5}")
    results = {}
    for mode in args.modes.split(","):
        r = results[mode] = night(mode, args)
        print(f"{mode:>12} {r['slots']:>5} {r['experiments']:>4} {r['runs']:>5} {r['wall_s']:7.1f} {r['per_hour']:7.1f} "
              f"{r['steady_per_hour']:7.1f} "
              f"{r['duty']:6.1%} {r['gap_s']:9.2f} {r['kept']:>5} {r['false_keeps']:>4} "
              f"({r['false_keeps'] / max(r['kept'], 1):.0%}) {r['rebases']:>5}", flush=True)
    if {"pipeline-1", "pipeline-4"} <= set(results):
        one, four = results["pipeline-1"], results["pipeline-4"]
        print(f"\n4 slots vs 1: {four['per_hour'] / one['per_hour']:.2f}x the ideas decided per hour over the "
              f"whole night, {four['steady_per_hour'] / one['steady_per_hour']:.2f}x once under way (steady), "
              f"{four['runs'] / four['wall_s'] / (one['runs'] / one['wall_s']):.2f}x the runs per hour; "
              f"1-slot pipeline duty {one['duty']:.1%}")


if __name__ == "__main__":
    main()
