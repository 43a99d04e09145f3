"""Stand-in prepare.py for the driver tests: the constants, metric_files and the driver's scoring
through the same protocol as the real one, with a tiny stand-in "model" instead of torch.

The validation rows are all token 1 (one byte); a ConstantModel(bpb) gives token 1 the probability
2 ** -bpb, so it scores exactly bpb. Its "weights" are that number, saved before it is scored; the
driver's check rebuilds an honest ConstantModel from them (serve_saved_model).

Usage: imported by driver.py and the stand-in train.py inside a test repository.
"""

import json
import math
import os
from pathlib import Path

import numpy as np

# ---------------------------------------------------------------------------
# Constants (fixed, do not modify)
# ---------------------------------------------------------------------------

MAX_SEQ_LEN = int(os.environ.get("AUTORESEARCH_MAX_SEQ_LEN", 2048))       # context length
TIME_BUDGET = int(os.environ.get("AUTORESEARCH_TIME_BUDGET", 300))        # training seconds
EVAL_TOKENS = int(os.environ.get("AUTORESEARCH_EVAL_TOKENS", 40 * 524288))  # tokens scored
VOCAB_SIZE = 8192                                                          # BPE vocabulary
CACHE_DIR = Path(os.environ.get("AUTORESEARCH_CACHE", Path.home() / ".cache" / "autoresearch"))
SCORER = os.environ.get("AUTORESEARCH_SCORER", "")                         # the driver's scorer
RUN_DIR = os.environ.get("AUTORESEARCH_RUN_DIR", ".")                      # the run's own directory
EVAL_ROWS, ROW_TOKENS = 8, 16                                              # the stand-in's val rows


def metric_files():
    """The prepared files the metric reads."""
    files = [CACHE_DIR / "val.bin", CACHE_DIR / "token_bytes.bin"]
    if not all(f.exists() for f in files):
        raise SystemExit(f"error: data is not prepared in {CACHE_DIR}: run `python prepare.py`")
    return files


def eval_rows():
    """The scored rows (every token 1) and the byte length of tokens 0 (special) and 1."""
    return np.ones((EVAL_ROWS, ROW_TOKENS + 1), dtype=np.uint16), np.array([0, 1])


def validation_files():
    return [CACHE_DIR / "val.bin"]


class ConstantModel:
    """The same distribution at every position: token 1 with probability 2 ** -bpb."""

    def __init__(self, bpb):
        self.bpb = bpb

    def logits(self, x):
        """(B, T, 2) for inputs x (B, T)."""
        nats = self.bpb * math.log(2)
        row = [math.log(max(-math.expm1(-nats), 1e-300)), -nats]
        return np.tile(np.array(row, dtype=np.float64), (*x.shape, 1))


def log_softmax(z):
    return z - (np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) + z.max(-1, keepdims=True))


def probe_rows(model):
    return lambda x, positions: model.logits(x)[np.arange(len(x)), positions]


def evaluate_bpb(model, tokenizer, batch_size):
    """The model's bits per byte: by hand its own number; under the driver, the driver's."""
    if not SCORER:
        return model.bpb
    from autoresearch import scoring
    (Path(RUN_DIR) / scoring.WEIGHTS_NAME).write_text(json.dumps({"bpb": model.bpb}))

    def score(x):
        logp = log_softmax(model.logits(x))
        return np.take_along_axis(logp[:, :-1], x[:, 1:, None].astype(np.int64), -1)[..., 0], model.logits(x)[:, -1]
    return scoring.serve(SCORER, {"batch_size": batch_size, "autocast": ""}, score, probe_rows(model))


def serve_saved_model():
    """The driver's check: an honest ConstantModel from the saved weights answers the probes."""
    from autoresearch import scoring
    if os.environ.get("STANDIN_CHECK_WRITES"):  # what a checking process writes into its compile cache
        (CACHE_DIR / "torchinductor" / "from-the-check.py").write_text("val prefixes")
    bpb = json.loads((Path(RUN_DIR) / scoring.WEIGHTS_NAME).read_text())["bpb"]
    scoring.serve(SCORER, {"batch_size": 0}, None, probe_rows(ConstantModel(bpb)))
