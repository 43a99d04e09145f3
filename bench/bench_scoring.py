"""What the driver's scoring adds to a run, at the default sizes: the scorer's side of the protocol
(every val row's inputs out, log-probabilities and last-position logits back, bits per byte computed)
and the check's probes (CHECK_POSITIONS rows out, one logits row each back), against a model process
that answers at once (zeros): the model's own forward passes are the same as the in-process metric's
and are not counted here. Also the weights' copy and hash at the default model's size.

With --real-cpu: the real train.py, small (the tests' sizes), trained on this CPU on the tests'
sample corpus and run by the driver's run_training, with and without the check, in the sandbox
where bubblewrap works: what a check adds to a run end to end (its process, the model's build, the
weights' load and the probes' forward passes).

Usage: python bench/bench_scoring.py [--rows 10240] [--seq-len 2048] [--batch 128] [--real-cpu]
"""

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from autoresearch import scoring  # noqa: E402

ANSWER = """
import sys, numpy as np
from autoresearch import scoring
V = int(sys.argv[2])
scoring.serve(sys.argv[1], {"batch_size": int(sys.argv[3]), "autocast": ""},
              lambda x: (np.zeros((len(x), x.shape[1] - 1), np.float32) - np.log(V), np.zeros((len(x), V), np.float32)),
              lambda x, p: np.zeros((len(x), V), np.float32))
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=10240, help="val rows scored (EVAL_TOKENS // MAX_SEQ_LEN)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=128, help="the model's eval batch (DEVICE_BATCH_SIZE)")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--weights-mb", type=int, default=140, help="the saved weights (the default model: ~140 MB)")
    parser.add_argument("--real-cpu", action="store_true", help="also time real small runs, checked and not")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    if args.real_cpu:
        real_cpu_runs()

    class Rows:  # the prepare module's side, at the given sizes
        CACHE_DIR = "bench"

        @staticmethod
        def eval_rows():
            return (rng.integers(4, args.vocab, (args.rows, args.seq_len + 1), dtype=np.uint16),
                    rng.integers(1, 8, args.vocab))

    with tempfile.TemporaryDirectory() as d:
        files = Path(d) / "files"
        files.mkdir()
        (files / scoring.WEIGHTS_NAME).write_bytes(rng.bytes(args.weights_mb << 20))
        t0 = time.perf_counter()
        scoring.validation(Rows)
        rows_s = time.perf_counter() - t0
        sock = scoring.short_socket_dir() / "s"
        scorer = scoring.Scorer(Rows, sock, files, Path(d) / "trusted").start()
        t0 = time.perf_counter()
        client = subprocess.Popen([sys.executable, "-c", ANSWER, str(sock), str(args.vocab), str(args.batch)],
                                  cwd=Path(__file__).resolve().parents[1])
        client.wait()
        score, why = scorer.finish()
        score_s = time.perf_counter() - t0
        assert why == "", why
        path = scoring.short_socket_dir() / "check"
        launch = lambda: subprocess.Popen([sys.executable, "-c", ANSWER, str(path), str(args.vocab), "0"],  # noqa: E731
                                          cwd=Path(__file__).resolve().parents[1])
        t0 = time.perf_counter()
        failure = scoring.check(score, Rows, path, launch, 600)
        check_s = time.perf_counter() - t0
        scoring.remove(sock.parent, path.parent)
    mb = args.rows * ((args.seq_len - 1) * 4 + args.vocab * 4 + args.seq_len * 2) / 2**20
    print(f"rows read once per driver: {rows_s:.2f} s ({args.rows} x {args.seq_len + 1} tokens)")
    print(f"scoring session: {score_s:.2f} s wall, client start included ({mb:,.0f} MB over the socket, "
          f"weights {args.weights_mb} MB copied and hashed)")
    print(f"check of a run: {check_s:.2f} s wall, client start included "
          f"({-(-scoring.CHECK_POSITIONS // args.batch) * args.batch} probes; verdict: {failure[:60] or 'agrees'})")


def real_cpu_runs():
    """Two small real runs each way (the check off, then on): seconds of run_training."""
    import importlib
    import os
    import re
    import shutil
    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "tests"))
    from driver_helpers import SMALL_TRAIN

    from autoresearch import sandbox, training
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        settings = {"max_seq_len": 128, "time_budget": 2, "eval_tokens": 16 * 128}
        os.environ.update({f"AUTORESEARCH_{k.upper()}": str(v) for k, v in settings.items()},
                          AUTORESEARCH_CACHE=str(d / "cache"))
        subprocess.run([sys.executable, "prepare.py", "--data", "tests/data/sample"], cwd=root, check=True,
                       capture_output=True)
        sys.path.insert(0, str(root))
        prepare = importlib.import_module("prepare")
        source = (root / "train.py").read_text()
        for name, value in SMALL_TRAIN.items():
            source = re.sub(rf"^{name} = [^#\n]*?(\s*#|$)", rf"{name} = {value}\1", source, count=1, flags=re.M)
        box = sandbox.choose("auto", False, root)
        for label, below in (("unchecked", 0.0), ("checked", float("inf"))) * 2:
            work = d / f"work-{label}"
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir()
            shutil.copy(root / "prepare.py", work)
            (work / "train.py").write_text(source)
            t0 = time.perf_counter()
            result = training.run_training(work, d / f"{label}.log", 42, 600, settings, d / "pid", sandbox=box,
                                           cache_dir=prepare.CACHE_DIR, prepare=prepare, check_below=below)
            print(f"real CPU run ({box.describe()}), {label}: {time.perf_counter() - t0:.1f} s in all "
                  f"({result.seconds:.1f} s of train.py), val_bpb {result.val_bpb:.4f}"
                  f"{f', {scoring.CHECK_POSITIONS} positions checked' if label == 'checked' else ''} {result.failure}",
                  flush=True)


if __name__ == "__main__":
    main()
