"""
Dataloader benchmark: tokens/s of prepare.make_dataloader for the train and val splits of a
prepared cache, the share of tokens discarded by cropping over one pass, and, for reference
in the same run, a plain linear-scan best-fit packer on the same documents.

Usage: AUTORESEARCH_CACHE=/path/to/cache taskset -c 0 python bench/bench_loader.py [--batch 128] [--seq 2048]
"""

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import prepare  # noqa: E402


def time_loader(tokenizer, B, T, split, seconds):
    """Batches/s after the first batch (which loads the split), as tokens/s."""
    loader = prepare.make_dataloader(tokenizer, B, T, split)
    next(loader)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        x, y, epoch = next(loader)
        n += 1
    if x.is_cuda:
        torch.cuda.synchronize()
    return n * B * T / (time.perf_counter() - start), epoch


def crop_stats(doc_lens, T, split):
    """Over the first pass: rows made, rows that end in a crop, tokens discarded / tokens read."""
    rows = prepare.pack_rows(doc_lens, T + 1, lambda e: prepare.epoch_order(len(doc_lens), split, e))
    n_rows = cropped = discarded = 0
    for pieces, epoch in rows:
        if epoch > 1:
            break
        n_rows += 1
        doc, n = pieces[-1]
        if n < doc_lens[doc]:
            cropped += 1
            discarded += doc_lens[doc] - n
    return n_rows, cropped, discarded / sum(doc_lens)


def naive_rows_per_s(doc_lens, T, seconds):
    """Rows/s of best-fit by a linear scan over the pool, in plain Python (the slow way)."""
    pool, queue, n, start = [], [], 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        space = T + 1
        while space:
            if not pool and not queue:  # the next pass, in stored order
                queue = list(range(len(doc_lens)))
            k = prepare.POOL_DOCS - len(pool)
            pool += queue[:k]
            del queue[:k]
            fits = [d for d in pool if doc_lens[d] <= space]
            doc = max(fits, key=doc_lens.__getitem__) if fits else min(pool, key=doc_lens.__getitem__)
            space -= min(doc_lens[doc], space)
            pool.remove(doc)
        n += 1
    return n / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description="dataloader tokens/s on a prepared cache")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--seq", type=int, default=prepare.MAX_SEQ_LEN)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    B, T = args.batch, args.seq
    tokenizer = prepare.Tokenizer.from_directory()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"cache {prepare.CACHE_DIR}, B={B}, T={T}, device {device}, "
          f"cpus allowed {len(os.sched_getaffinity(0))}, torch threads {torch.get_num_threads()}")
    for split in ("train", "val"):
        tokens, offsets = prepare.load_tokens(split, tokenizer)
        doc_lens = np.diff(offsets).tolist()
        tok_s, epoch = time_loader(tokenizer, B, T, split, args.seconds)
        n_rows, cropped, discarded = crop_stats(doc_lens, T, split)
        naive = naive_rows_per_s(doc_lens, T, min(args.seconds, 2.0)) * (T + 1)
        print(f"{split:5s}: {len(tokens) / 1e6:8.2f}M tokens, {len(doc_lens):,} docs "
              f"(mean {np.mean(doc_lens):.0f} tokens) | loader {tok_s / 1e6:6.1f}M tokens/s "
              f"(reached epoch {epoch}) | naive linear-scan packing alone {naive / 1e6:5.2f}M tokens/s | "
              f"first pass: {n_rows:,} rows, {cropped / n_rows:.0%} end in a crop, "
              f"{discarded:.1%} of tokens discarded")


if __name__ == "__main__":
    main()
