"""Stand-in prepare.py for the driver tests: the constants and metric_files, no torch.

Usage: imported by driver.py and the stand-in train.py inside a test repository.
"""

import os
from pathlib import Path

# ---------------------------------------------------------------------------
# Constants (fixed, do not modify)
# ---------------------------------------------------------------------------

MAX_SEQ_LEN = int(os.environ.get("AUTORESEARCH_MAX_SEQ_LEN", 2048))       # context length
TIME_BUDGET = int(os.environ.get("AUTORESEARCH_TIME_BUDGET", 300))        # training seconds
EVAL_TOKENS = int(os.environ.get("AUTORESEARCH_EVAL_TOKENS", 40 * 524288))  # tokens scored
VOCAB_SIZE = 8192                                                          # BPE vocabulary
CACHE_DIR = Path(os.environ.get("AUTORESEARCH_CACHE", Path.home() / ".cache" / "autoresearch"))


def metric_files():
    """The prepared files the metric reads."""
    files = [CACHE_DIR / "val.bin", CACHE_DIR / "token_bytes.bin"]
    if not all(f.exists() for f in files):
        raise SystemExit(f"error: data is not prepared in {CACHE_DIR}: run `python prepare.py`")
    return files


def evaluate_bpb(model, tokenizer, batch_size):
    """Bits per byte of the model on the fixed validation rows (stand-in)."""
    return model.bpb
