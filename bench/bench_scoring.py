"""What the driver's scoring adds to a run, at the default sizes: the scorer's side of the protocol
(every val row's inputs out, log-probabilities and last-position logits back, bits per byte computed)
and the check's probes (CHECK_POSITIONS rows out, one logits row each back), against a model process
that answers at once (zeros): the model's own forward passes are the same as the in-process metric's
and are not counted here. Also the weights' copy and hash at the default model's size.

Usage: python bench/bench_scoring.py [--rows 10240] [--seq-len 2048] [--batch 128]
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
    args = parser.parse_args()
    rng = np.random.default_rng(0)

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
    mb = args.rows * ((args.seq_len - 1) * 4 + args.vocab * 4 + args.seq_len * 2) / 2**20
    print(f"rows read once per driver: {rows_s:.2f} s ({args.rows} x {args.seq_len + 1} tokens)")
    print(f"scoring session: {score_s:.2f} s wall, client start included ({mb:,.0f} MB over the socket, "
          f"weights {args.weights_mb} MB copied and hashed)")
    print(f"check of a run: {check_s:.2f} s wall, client start included "
          f"({-(-scoring.CHECK_POSITIONS // args.batch) * args.batch} probes; verdict: {failure[:60] or 'agrees'})")


if __name__ == "__main__":
    main()
