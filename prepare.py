"""
Fixed data preparation, dataloader and metric for autoresearch. The LLM never edits this file.

Downloads ClimbMix shards (or reads your own text files), trains the BPE tokenizer, writes
pre-tokenized uint16 token files, and offers what train.py imports: the constants, the
Tokenizer, make_dataloader and the fixed metric evaluate_bpb. Every step can be re-run:
finished work is checked and skipped, unfinished work is redone, nothing half-written is used.

Usage: python prepare.py [--num-shards N] [--data PATH ...]
"""

import argparse
import hashlib
import io
import itertools
import json
import math
import os
import pickle
import re
import sys
import threading
import time
from bisect import bisect_left, bisect_right, insort
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import requests
import rustbpe
import tiktoken

# ---------------------------------------------------------------------------
# Constants (fixed, do not modify); the AUTORESEARCH_* environment is read here and only here
# ---------------------------------------------------------------------------


def _env(name, default):
    """AUTORESEARCH_<name> if set, else default; a number must be a positive whole number."""
    value = os.environ.get(f"AUTORESEARCH_{name}")
    if value is None or isinstance(default, str):
        return default if value is None else value
    if not value.strip().isdigit() or int(value) <= 0:
        raise SystemExit(f"error: AUTORESEARCH_{name}={value!r} must be a positive whole number")
    return int(value)


CLIMBMIX_URL = "https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main"

MAX_SEQ_LEN = _env("MAX_SEQ_LEN", 2048)         # context length of every training and eval row
TIME_BUDGET = _env("TIME_BUDGET", 300)          # training seconds per experiment (wall clock)
EVAL_TOKENS = _env("EVAL_TOKENS", 40 * 524288)  # tokens scored by evaluate_bpb
VOCAB_SIZE = 8192                               # BPE vocabulary, special tokens included
SEED = _env("SEED", 42)                         # the run's seed (the driver sets it): train.py's init
CACHE_DIR = Path(_env("CACHE", "~/.cache/autoresearch")).expanduser()  # all prepared data
DATA_URL = _env("DATA_URL", CLIMBMIX_URL)       # where shards come from (a mirror, a test server)
SCORER = _env("SCORER", "")                     # the driver's scorer (a socket): under the driver, it scores
RUN_DIR = _env("RUN_DIR", ".")                  # the run's own directory (the driver sets it): saved weights
CHECK_AUTOCAST = _env("CHECK_AUTOCAST", "")     # the driver's check of a run: the autocast dtype it scored with
DEVICE_BATCH = _env("DEVICE_BATCH", 0)          # most rows per micro-step (the driver's re-run after out of memory); 0: no cap
# train.py's compiled kernels live in the cache too, so a warm compile is seconds, a cold one minutes.
# Set before torch is imported (some of its modules read it at import) and not as a default: a value
# inherited from a parent process that used another cache would otherwise win.
os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(CACHE_DIR / "torchinductor")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

VAL_SHARD = 6542                                # the pinned ClimbMix validation shard (the last one)
DEFAULT_NUM_SHARDS = 10                         # ClimbMix train shards downloaded by default
DOWNLOAD_WORKERS = 8                            # parallel shard downloads
DOWNLOAD_ATTEMPTS = 5                           # tries per shard before giving up
DOWNLOAD_BACKOFF_S = 2.0                        # wait after the first failed try; doubles each time
DOWNLOAD_TIMEOUT_S = 30                         # connect / read timeout of one request

DOC_CHARS = 4000                                # local corpora: longest document (~half a row)
VAL_SHARE = 0.05                                # local corpora: share of documents in val
LOCAL_SUFFIXES = (".txt", ".md", ".jsonl", ".parquet")  # the file types --data reads

SPECIAL_TOKENS = [f"<|reserved_{i}|>" for i in range(4)]  # special tokens, the last 4 ids
BOS_TOKEN = SPECIAL_TOKENS[0]                   # begins every document
TOKENIZER_MAX_CHARS = 1_000_000_000             # tokenizer training reads at most this much text
TOKENIZER_DOC_CHARS = 10_000                    # ... and at most this much of each document
FIT_HEADROOM = 0.10                             # the device-batch fit leaves this share of free GPU memory ...
FIT_RESERVE = 2**30                             # ... and this many bytes more unused (allocator, workspaces, kernels)
POOL_DOCS = 1000                                # dataloader: documents to choose from per row
CAUSALITY_RTOL = 1e-3                           # metric: an earlier logit may move this much (x largest logit)
DATA_ORDER_SEED = 42                            # train order: the same on every run, whatever SEED is
# GPT-4 style pre-tokenization split, numbers in groups of 1-2 (SPEC §2)
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""

# ---------------------------------------------------------------------------
# Small helpers: messages, progress, records, atomic writes
# ---------------------------------------------------------------------------


def fail(message):
    """Stop with one line saying what went wrong and what to do."""
    raise SystemExit(f"error: {message}")


_last_progress_s = 0.0


def show_progress(text, final=False):
    """A status line on stderr: redrawn in place on a terminal, a new line every 15 s in a log."""
    global _last_progress_s
    now, tty = time.monotonic(), sys.stderr.isatty()
    if final or now - _last_progress_s >= (0.25 if tty else 15):
        sys.stderr.write("\r" + text.ljust(72) + ("\n" if final else "") if tty else text + "\n")
        sys.stderr.flush()
        _last_progress_s = now


def describe_files(paths):
    """What a set of input files is, cheaply: path, size and modification time of each."""
    return [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in paths]


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_meta(path):
    """A step's JSON record, or None if it is missing or unreadable (then the step is redone)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def write_atomic(path, data):
    """Write bytes to a temporary name, then rename: a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def npy_bytes(array):
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


# ---------------------------------------------------------------------------
# ClimbMix download (the default source)
# ---------------------------------------------------------------------------


class DownloadError(Exception):
    """A shard that cannot be downloaded; main() turns it into one line."""


def is_good_parquet(path):
    """Cheap check that a shard is complete: its footer parses and it has a `text` column."""
    try:
        with pq.ParquetFile(path) as f:
            return "text" in f.schema_arrow.names
    except (OSError, pa.ArrowException):
        return False


def why(error):
    """A short reason for a failed request."""
    if isinstance(error, requests.ConnectionError):
        return "cannot connect"
    if isinstance(error, requests.Timeout):
        return "timed out"
    if isinstance(error, requests.HTTPError):
        return f"HTTP {error.response.status_code}"
    return str(error)[:120] or type(error).__name__


def fetch_shard(name, data_dir, stop, counter):
    """Download one shard to `<name>.tmp`, check it opens as parquet, then rename it into place."""
    url, path = f"{DATA_URL}/{name}", data_dir / name
    tmp = path.with_name(name + ".tmp")
    for attempt in range(DOWNLOAD_ATTEMPTS):
        if attempt:
            time.sleep(DOWNLOAD_BACKOFF_S * 2 ** (attempt - 1))
        if stop.is_set():
            return
        try:
            with requests.get(url, stream=True, timeout=DOWNLOAD_TIMEOUT_S) as response:
                if 400 <= response.status_code < 500 and response.status_code != 429:
                    raise DownloadError(f"{url} answered HTTP {response.status_code}; "
                                        "check AUTORESEARCH_DATA_URL and --num-shards")
                response.raise_for_status()
                with open(tmp, "wb") as f:
                    for chunk in response.iter_content(1 << 20):
                        if stop.is_set():
                            return
                        f.write(chunk)
                        counter[0] += len(chunk)
            if not is_good_parquet(tmp):
                raise ValueError("the file received is not a readable parquet shard")
            os.replace(tmp, path)
            return
        except (requests.RequestException, ValueError, OSError) as e:
            error = e
        finally:
            tmp.unlink(missing_ok=True)
    raise DownloadError(
        f"cannot download {name} from {DATA_URL} ({why(error)}, {DOWNLOAD_ATTEMPTS} attempts); "
        "check the network or AUTORESEARCH_DATA_URL, or prepare your own text offline "
        "with: python prepare.py --data PATH")


def download_climbmix(num_shards):
    """Make sure train shards 0..num_shards-1 and the val shard are complete; return the source."""
    if not 1 <= num_shards <= VAL_SHARD:
        fail(f"--num-shards must be between 1 and {VAL_SHARD}")
    data_dir = CACHE_DIR / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    paths = [data_dir / f"shard_{i:05d}.parquet" for i in [*range(num_shards), VAL_SHARD]]
    todo = [p.name for p in paths if not is_good_parquet(p)]
    for name in todo:
        if (data_dir / name).exists():
            print(f"{name} is incomplete or unreadable; downloading it again")
    if todo:
        print(f"downloading {len(todo)} of {len(paths)} shards from {DATA_URL}")
        stop, counter = threading.Event(), [0]
        with ThreadPoolExecutor(DOWNLOAD_WORKERS) as pool:
            pending = {pool.submit(fetch_shard, n, data_dir, stop, counter) for n in todo}
            try:
                while pending:
                    done, pending = wait(pending, timeout=0.25, return_when=FIRST_EXCEPTION)
                    for future in done:
                        future.result()
                    show_progress(f"downloading: {len(todo) - len(pending)}/{len(todo)} shards, "
                                  f"{counter[0] / 1e6:,.0f} MB", final=not pending)
            except BaseException as e:
                stop.set()
                for future in pending:
                    future.cancel()
                if sys.stderr.isatty():
                    sys.stderr.write("\n")  # end the progress line
                if isinstance(e, DownloadError):
                    fail(str(e))
                raise
    return {"local": False, "train": paths[:-1], "val": paths[-1:]}


# ---------------------------------------------------------------------------
# Local corpora (--data PATH ...): files, records, documents, the val split
# ---------------------------------------------------------------------------

PARAGRAPH_BREAK = re.compile(r"\n[ \t]*(?:\n[ \t]*)+")  # one or more blank lines
LINE_END = re.compile(r"[.!?][\"'\u201d\u2019)\]]*[ \t]*(?=\n)")  # best cut: after a line's last sentence
SENTENCE_END = re.compile(r"[.!?][\"'\u201d\u2019)\]]*(?=\s)")     # next: after any sentence end
WHITESPACE = re.compile(r"\s")                                     # else before a space, else anywhere


def list_local_files(paths):
    """The files behind --data: files as given, directories recursively in sorted order."""
    files = []
    for given in map(Path, paths):
        if not given.exists():
            fail(f"--data {given}: no such file or directory")
        found = [given] if given.is_file() else sorted(
            p for p in given.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(given).parts))
        for p in found:
            if p.suffix.lower() not in LOCAL_SUFFIXES:
                fail(f"{p}: unsupported file type (use {', '.join(LOCAL_SUFFIXES)}, "
                     "or point --data at the files to use)")
        files += [p.resolve() for p in found]
    if not files:
        fail(f"no files found in {' '.join(map(str, paths))}")
    return list(dict.fromkeys(files))


def read_texts(path):
    """Yield the texts of one file: the whole .txt/.md, each .jsonl record's or parquet row's `text`."""
    if path.suffix.lower() == ".parquet":
        try:
            f = pq.ParquetFile(path)
        except (OSError, pa.ArrowException) as e:
            fail(f"{path}: not a readable parquet file ({str(e)[:80]})")
        schema = f.schema_arrow
        if "text" not in schema.names or schema.field("text").type not in (pa.string(), pa.large_string()):
            fail(f"{path}: no 'text' column of strings (columns: {', '.join(schema.names)})")
        try:
            for batch in f.iter_batches(columns=["text"], batch_size=1024):
                yield from (t for t in batch.column(0).to_pylist() if t)
        except (OSError, pa.ArrowException) as e:
            fail(f"{path}: damaged parquet file ({str(e)[:80]}); replace or delete it")
        return
    try:
        raw = path.read_bytes()
    except OSError as e:
        fail(f"{path}: cannot read it ({e.strerror})")
    if b"\0" in raw:
        nul_at = raw.index(b"\0")
        fail(f"{path}: binary data (a NUL byte at offset {nul_at}); only UTF-8 text is read")
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        fail(f"{path}: not UTF-8 text (invalid byte at offset {e.start}); convert it to UTF-8")
    if path.suffix.lower() != ".jsonl":
        yield text
        return
    for line_no, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            fail(f"{path}:{line_no}: not a JSON object")
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            fail(f"{path}:{line_no}: no \"text\" string field")
        yield record["text"]


def _last_cut(pattern, window, limit, at_end):
    """The last cut position <= limit at a match of pattern (after it or before it), or 0."""
    cut = 0
    for m in pattern.finditer(window):
        at = m.end() if at_end else m.start()
        cut = at if at <= limit else cut
    return cut


def split_long(text, limit):
    """Cut text into pieces of at most limit chars, each cut at the best place the window offers."""
    pieces = []
    while len(text) > limit:
        window = text[:limit + 1]  # one more char, so a sentence end at the limit is seen
        cut = (_last_cut(LINE_END, window, limit, True) or _last_cut(SENTENCE_END, window, limit, True)
               or _last_cut(WHITESPACE, window, limit, False) or limit)
        pieces.append(text[:cut].rstrip())
        text = text[cut:].lstrip()
    return [p for p in pieces + [text] if p.strip()]


def split_documents(text):
    """Cut a text into documents of at most DOC_CHARS: paragraphs grouped, long ones split."""
    docs, current = [], ""
    for paragraph in PARAGRAPH_BREAK.split(text.replace("\r\n", "\n")):
        for piece in split_long(paragraph.strip("\n").rstrip(), DOC_CHARS):
            if current and len(current) + 2 + len(piece) <= DOC_CHARS:
                current += "\n\n" + piece
            else:
                docs.append(current)
                current = piece
    return [d for d in docs + [current] if d]


def split_of(doc):
    """The split a local document belongs to, from a stable hash of its text."""
    h = int.from_bytes(hashlib.blake2b(doc.encode(), digest_size=8).digest(), "big")
    return "val" if h < VAL_SHARE * 2**64 else "train"


def iter_documents(source, split, paths=None):
    """Yield the documents of a split in stored order (ClimbMix texts as they are)."""
    for path in source[split] if paths is None else paths:
        for text in read_texts(path):
            if not source["local"]:
                yield text
                continue
            yield from (d for d in split_documents(text) if split_of(d) == split)


# ---------------------------------------------------------------------------
# Tokenizer: rustbpe to train, tiktoken to encode
# ---------------------------------------------------------------------------

TOKENIZER_RECIPE = {"vocab_size": VOCAB_SIZE, "pattern": SPLIT_PATTERN, "specials": SPECIAL_TOKENS,
                    "max_chars": TOKENIZER_MAX_CHARS, "doc_chars": TOKENIZER_DOC_CHARS,
                    "local_doc_chars": DOC_CHARS, "val_share": VAL_SHARE}


class Tokenizer:
    """The trained BPE as a tiktoken Encoding (`.enc`), plus the fingerprint of its file."""

    def __init__(self, enc, fingerprint):
        self.enc = enc
        self.fingerprint = fingerprint
        self.bos_token_id = enc.encode_single_token(BOS_TOKEN)

    @classmethod
    def from_directory(cls, path=None):
        """Load the tokenizer that prepare.py saved (default: CACHE_DIR/tokenizer)."""
        file = Path(path or CACHE_DIR / "tokenizer") / "tokenizer.pkl"
        try:
            data = file.read_bytes()
        except OSError:
            fail(f"no tokenizer at {file}: run `python prepare.py` first")
        saved = pickle.loads(data)
        enc = tiktoken.Encoding(name="autoresearch", pat_str=saved["pattern"],
                                mergeable_ranks=saved["mergeable_ranks"],
                                special_tokens=saved["special_tokens"])
        return cls(enc, hashlib.sha256(data).hexdigest()[:16])

    def get_vocab_size(self):
        return self.enc.n_vocab

    def get_bos_token_id(self):
        return self.bos_token_id

    def encode(self, text, prepend=None, num_threads=8):
        """Ids of a text (a list) or of a list of texts (a list of lists); specials in text stay text."""
        first = [] if prepend is None else [
            prepend if isinstance(prepend, int) else self.enc.encode_single_token(prepend)]
        if isinstance(text, str):
            return first + self.enc.encode_ordinary(text)
        return [first + ids for ids in self.enc.encode_ordinary_batch(text, num_threads=num_threads)]

    def decode(self, ids):
        return self.enc.decode(ids.tolist() if hasattr(ids, "tolist") else list(ids))


def get_token_bytes(device="cpu"):
    """UTF-8 byte length of every token id (0 for the special tokens), for the metric."""
    file = CACHE_DIR / "tokenizer" / "token_bytes.npy"
    if not file.exists():
        fail(f"no token_bytes table at {file}: run `python prepare.py` first")
    return torch.from_numpy(np.load(file)).to(device)


def train_tokenizer(source):
    """Train the BPE on the train split, check it, save it, token_bytes and a record of its inputs."""
    out = CACHE_DIR / "tokenizer"
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)  # the old files are no longer vouched for
    read, state = [], {"chars": 0, "complete": True}

    def texts():
        for path in source["train"]:
            read.append(path)
            for doc in iter_documents(source, "train", [path]):
                doc = doc[:TOKENIZER_DOC_CHARS]
                state["chars"] += len(doc)
                show_progress(f"tokenizer: read {state['chars'] / 1e6:,.1f}M chars")
                yield doc
                if state["chars"] >= TOKENIZER_MAX_CHARS:
                    state["complete"] = False  # any source starting with `read` gives this text
                    return

    t0 = time.time()
    bpe = rustbpe.Tokenizer()
    bpe.train_from_iterator(texts(), VOCAB_SIZE - len(SPECIAL_TOKENS), pattern=SPLIT_PATTERN)
    if state["chars"] == 0:
        fail(f"no text to train on in {', '.join(map(str, source['train']))}: "
             "the corpus is empty; add text")
    show_progress(f"tokenizer: trained on {state['chars'] / 1e6:,.1f}M chars "
                  f"in {time.time() - t0:.1f}s", final=True)
    ranks = {bytes(token): rank for token, rank in bpe.get_mergeable_ranks()}
    if len(ranks) != VOCAB_SIZE - len(SPECIAL_TOKENS):
        fail(f"the train split is too small to learn {VOCAB_SIZE} tokens "
             f"(it gave {len(ranks) + len(SPECIAL_TOKENS)}); add more text")
    specials = {s: len(ranks) + i for i, s in enumerate(SPECIAL_TOKENS)}
    enc = tiktoken.Encoding(name="autoresearch", pat_str=SPLIT_PATTERN,
                            mergeable_ranks=ranks, special_tokens=specials)
    samples = [next(iter_documents(source, "train"), ""), "Héllo wörld 123456 — 東京 🙂\r\n\t x",
               "<|reserved_0|> is plain text here"]
    for s in samples:  # tiktoken must reproduce rustbpe and round-trip
        ids = enc.encode_ordinary(s)
        if ids != bpe.encode(s) or enc.decode(ids) != s:
            fail(f"tokenizer sanity check failed on {s[:40]!r}; please report this")
    data = pickle.dumps({"pattern": SPLIT_PATTERN, "mergeable_ranks": ranks, "special_tokens": specials})
    write_atomic(out / "tokenizer.pkl", data)
    meta = {"recipe": TOKENIZER_RECIPE, "inputs": describe_files(read), "complete": state["complete"],
            "fingerprint": hashlib.sha256(data).hexdigest()[:16]}
    write_token_bytes(enc, meta)


def write_token_bytes(enc, meta):
    """token_bytes.npy from the tokenizer, then the tokenizer's record with its hash (written last)."""
    out = CACHE_DIR / "tokenizer"
    n_special = len(SPECIAL_TOKENS)
    token_bytes = [len(enc.decode_single_token_bytes(i)) for i in range(enc.n_vocab - n_special)]  # bytes, not text
    data = npy_bytes(np.array(token_bytes + [0] * n_special, dtype=np.int32))
    write_atomic(out / "token_bytes.npy", data)
    meta["token_bytes_sha256"] = hashlib.sha256(data).hexdigest()
    write_atomic(out / "meta.json", json.dumps(meta, indent=1).encode())


def ensure_tokenizer(source):
    """Reuse the saved tokenizer if it was trained on what this source would feed it, else retrain."""
    out = CACHE_DIR / "tokenizer"
    meta, inputs = read_meta(out / "meta.json"), describe_files(source["train"])
    saved = (out / "tokenizer.pkl").exists() and (out / "token_bytes.npy").exists()
    if meta and saved and meta["recipe"] == TOKENIZER_RECIPE:
        used = meta["inputs"]  # all train files, or the prefix read before the char limit
        if used == (inputs if meta["complete"] else inputs[:len(used)]):
            tokenizer = Tokenizer.from_directory(out)
            if tokenizer.fingerprint == meta["fingerprint"]:
                if meta.get("token_bytes_sha256") != sha256_file(out / "token_bytes.npy"):
                    if "token_bytes_sha256" in meta:  # (absent: written by an older prepare.py)
                        print("tokenizer: token_bytes.npy changed on disk; writing it again")
                    write_token_bytes(tokenizer.enc, meta)
                print("tokenizer: up to date")
                return tokenizer
    if meta:
        print("tokenizer: the training data changed (or the files did); retraining, "
              "then rebuilding the token files")
    train_tokenizer(source)
    return Tokenizer.from_directory(out)


# ---------------------------------------------------------------------------
# Pre-tokenized splits: <split>.bin (uint16 tokens), <split>.offsets.npy, <split>.json
# ---------------------------------------------------------------------------


def token_paths(split):
    d = CACHE_DIR / "tokens"
    return d / f"{split}.bin", d / f"{split}.offsets.npy", d / f"{split}.json"


def tokens_up_to_date(split, tokenizer, inputs=None):
    """The split's record if its token files are complete and match the tokenizer (and inputs, and,
    when inputs are given, i.e. in `python prepare.py`, the content hashes of both files)."""
    bin_path, offsets_path, meta_path = token_paths(split)
    meta = read_meta(meta_path)
    if not meta or meta["tokenizer"] != tokenizer.fingerprint or not offsets_path.exists():
        return None
    if inputs is not None and (meta["inputs"] != inputs or meta["recipe"] != TOKENIZER_RECIPE):
        return None
    if not bin_path.exists() or bin_path.stat().st_size != 2 * meta["n_tokens"]:
        return None
    if inputs is not None:
        hashes = token_hashes(split)
        if "sha256" not in meta:  # written by an older prepare.py: vouch for them from now on
            meta["sha256"] = hashes
            write_atomic(meta_path, json.dumps(meta, indent=1).encode())
        elif meta["sha256"] != hashes:
            print(f"{split} tokens: the files changed on disk since they were written; rebuilding them")
            return None
    return meta


def token_hashes(split):
    bin_path, offsets_path, _ = token_paths(split)
    return {"bin": sha256_file(bin_path), "offsets": sha256_file(offsets_path)}


def tokenize_split(source, split, tokenizer):
    """Encode every document of a split once (BOS first) into uint16 token and offset files."""
    bin_path, offsets_path, meta_path = token_paths(split)
    bin_path.parent.mkdir(parents=True, exist_ok=True)
    meta_path.unlink(missing_ok=True)  # the old files are no longer vouched for
    tmp = bin_path.with_name(bin_path.name + ".tmp")
    docs, lengths, n_tokens = iter_documents(source, split), [], 0
    try:
        with open(tmp, "wb") as f:
            while batch := list(itertools.islice(docs, 4096)):
                rows = tokenizer.encode(batch, prepend=tokenizer.bos_token_id,
                                        num_threads=os.cpu_count())
                f.write(np.concatenate([np.array(r, dtype=np.uint16) for r in rows]).tobytes())
                lengths += map(len, rows)
                n_tokens += sum(map(len, rows))
                show_progress(f"tokenizing {split}: {len(lengths):,} documents, "
                              f"{n_tokens:,} tokens")
        if not lengths:
            fail(f"the {split} split has no documents; add more text")
        show_progress(f"tokenized {split}: {len(lengths):,} documents, {n_tokens:,} tokens",
                      final=True)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        write_atomic(offsets_path, npy_bytes(offsets))
        os.replace(tmp, bin_path)
    finally:
        tmp.unlink(missing_ok=True)
    meta = {"tokenizer": tokenizer.fingerprint, "inputs": describe_files(source[split]),
            "recipe": TOKENIZER_RECIPE, "n_tokens": int(offsets[-1]), "n_docs": len(lengths),
            "sha256": token_hashes(split)}
    write_atomic(meta_path, json.dumps(meta, indent=1).encode())
    return meta


def load_tokens(split, tokenizer):
    """The split's tokens (memory-mapped) and document offsets, checked against the tokenizer."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', not {split!r}")
    meta = tokens_up_to_date(split, tokenizer)
    if meta is None:
        fail(f"no {split} tokens for this tokenizer in {CACHE_DIR}: run `python prepare.py`")
    bin_path, offsets_path, _ = token_paths(split)
    return np.asarray(np.memmap(bin_path, dtype=np.uint16, mode="r")), np.load(offsets_path)


def metric_files():
    """The prepared files evaluate_bpb depends on; exits with the command to run if they are missing."""
    tok_dir = CACHE_DIR / "tokenizer"
    meta = read_meta(tok_dir / "meta.json")
    val = read_meta(token_paths("val")[2])
    files = [tok_dir / "tokenizer.pkl", tok_dir / "token_bytes.npy", *token_paths("val")[:2]]
    ok = meta and val and all(f.exists() for f in files)
    if not ok or not val["tokenizer"] == meta["fingerprint"] == Tokenizer.from_directory().fingerprint:
        fail(f"data is not prepared in {CACHE_DIR}: run `python prepare.py` "
             "(or `python prepare.py --data PATH` for your own text)")
    return files


# ---------------------------------------------------------------------------
# Dataloader: best-fit packing of BOS-aligned rows
# ---------------------------------------------------------------------------


def epoch_order(n_docs, split, epoch):
    """Document order of one pass: val as stored; train shuffled per epoch, the same on every run."""
    if split == "val":
        return list(range(n_docs))
    return np.random.default_rng([DATA_ORDER_SEED, epoch]).permutation(n_docs).tolist()


def pack_rows(doc_lens, row_len, order_of_epoch):
    """Yield (pieces, epoch) forever, one row of row_len tokens at a time; a piece is (doc, n_tokens).

    Best-fit from a pool of POOL_DOCS documents kept full in epoch order: take the largest
    document that fits the space left (the earliest of that length); if none fits, crop the
    shortest to fill the row exactly. A cropped document's remainder is discarded, as in the
    original: it has no BOS and has lost its beginning, so it would start a row mid-document,
    and discarding keeps "every document once per pass" trivially true. The pool drains
    completely before the next epoch's documents enter.
    """
    epoch, order, next_pos = 0, [], 0
    pool = []  # sorted keys: length << 32 | position in this epoch's order (unique, tie-break)
    while True:
        pieces, space = [], row_len
        while space:
            if not pool and next_pos == len(order):
                epoch, order, next_pos = epoch + 1, order_of_epoch(epoch + 1), 0
            while len(pool) < POOL_DOCS and next_pos < len(order):
                insort(pool, doc_lens[order[next_pos]] << 32 | next_pos)
                next_pos += 1
            fit = bisect_right(pool, space << 32 | 0xFFFFFFFF)
            if fit:
                key = pool.pop(bisect_left(pool, pool[fit - 1] >> 32 << 32))
                take = key >> 32
            else:
                key, take = pool.pop(0), space
            pieces.append((order[key & 0xFFFFFFFF], take))
            space -= take
        yield pieces, epoch


def row_slices(tokens, offsets, row_len, split):
    """Yield (the token slices that make one row of row_len tokens, epoch) forever, as pack_rows packs."""
    starts, doc_lens = offsets[:-1].tolist(), np.diff(offsets).tolist()
    for pieces, epoch in pack_rows(doc_lens, row_len, lambda e: epoch_order(len(doc_lens), split, e)):
        yield [tokens[starts[d]:starts[d] + n] for d, n in pieces], epoch


def make_dataloader(tokenizer, B, T, split):
    """Yield (inputs, targets, epoch) forever: int64 (B, T), on CUDA if available; rows as pack_rows."""
    rows = row_slices(*load_tokens(split, tokenizer), T + 1, split)
    use_cuda = torch.cuda.is_available()

    def batches():
        while True:
            slices = []
            for _ in range(B):
                row, epoch = next(rows)
                slices += row
            batch = np.concatenate(slices).reshape(B, T + 1)
            # A fresh (pinned) host tensor per batch: the caching host allocator hands its memory
            # out again only after the asynchronous copy that reads it has finished.
            host = torch.empty((2, B, T), dtype=torch.int64, pin_memory=use_cuda)
            view = host.numpy()
            view[0], view[1] = batch[:, :-1], batch[:, 1:]
            if use_cuda:
                host = host.to("cuda", non_blocking=True)
            yield host[0], host[1], epoch

    return batches()


# ---------------------------------------------------------------------------
# Fitting a run to its GPU: the device batch is a run setting, like the seed
# ---------------------------------------------------------------------------


def memory_budget(free_bytes):
    """What a run may plan to use of `free_bytes` of GPU memory: FIT_HEADROOM and FIT_RESERVE stay
    free, for what the estimate leaves out (the allocator's rounding and caching, cuBLAS and cuDNN
    workspaces, compiled kernels)."""
    return int(free_bytes * (1 - FIT_HEADROOM)) - FIT_RESERVE


def choose_device_batch(rows_per_step, largest, need_bytes, budget):
    """The most rows per micro-step that divide rows_per_step (gradient accumulation keeps the
    optimizer step), are at most `largest`, and whose need_bytes(rows) is within `budget` (None: no
    budget, the CPU); None when not even one row fits."""
    for rows in range(min(largest, rows_per_step), 0, -1):
        if rows_per_step % rows == 0 and (budget is None or need_bytes(rows) <= budget):
            return rows
    return None


def gpu_free_bytes():
    """Free memory on the current GPU, within the per-process cap if one is set (a fraction of it)."""
    free, total = torch.cuda.mem_get_info()
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda: 1.0)()
    if fraction < 1.0:
        free = min(free, int(fraction * total) - torch.cuda.memory_reserved())
    return max(free, 0)


def fit_device_batch(device_batch_size, total_batch_size, need_bytes):
    """(rows per micro-step, micro-steps per optimizer step) for this run: the most rows, up to
    train.py's DEVICE_BATCH_SIZE (and the driver's AUTORESEARCH_DEVICE_BATCH), that divide the
    step's rows and whose estimated peak memory, need_bytes(rows) (train.py's estimate), fits the
    GPU's free memory less the headroom. Said in one line that starts with "fit:"; a GPU without
    bf16, or one where not even one row fits, stops the run here, before the model is built."""
    if total_batch_size % MAX_SEQ_LEN or total_batch_size < MAX_SEQ_LEN:
        fail(f"TOTAL_BATCH_SIZE={total_batch_size} must be a multiple of MAX_SEQ_LEN={MAX_SEQ_LEN} (whole rows)")
    if device_batch_size < 1:
        fail(f"DEVICE_BATCH_SIZE={device_batch_size} must be at least 1")
    rows_per_step = total_batch_size // MAX_SEQ_LEN
    largest = min(device_batch_size, DEVICE_BATCH or device_batch_size)
    why = f"at most {largest} (AUTORESEARCH_DEVICE_BATCH)" if largest < device_batch_size else \
        f"at most DEVICE_BATCH_SIZE={device_batch_size}"
    if not torch.cuda.is_available():
        rows = choose_device_batch(rows_per_step, largest, need_bytes, None)
        print(f"fit: cpu, no memory fit: device batch {rows} rows ({why}), {rows_per_step // rows} accumulation "
              f"steps of {total_batch_size:,} tokens", flush=True)
        return rows, rows_per_step // rows
    name, (major, minor) = torch.cuda.get_device_name(), torch.cuda.get_device_capability()
    if (major, minor) < (8, 0):  # (torch.cuda.is_bf16_supported() also says yes where bf16 is only emulated)
        fail(f"{name} (compute capability {major}.{minor}) has no bf16, which training needs: use a GPU of "
             "compute capability 8.0 or newer (A100, RTX 30xx, or newer)")
    free = gpu_free_bytes()
    budget = memory_budget(free)
    rows = choose_device_batch(rows_per_step, largest, need_bytes, budget)
    if rows is None:
        fail(f"the model does not fit {name}: even a device batch of 1 row needs about {need_bytes(1) / 2**30:.1f} "
             f"GiB by train.py's estimate, and {max(budget, 0) / 2**30:.1f} of {free / 2**30:.1f} GiB free may be "
             f"used; shorten the rows (AUTORESEARCH_MAX_SEQ_LEN, now {MAX_SEQ_LEN}) or shrink the model (DEPTH)")
    bigger = next((r for r in range(rows + 1, min(largest, rows_per_step) + 1) if rows_per_step % r == 0), None)
    if bigger:
        why = f"{bigger} rows would need {need_bytes(bigger) / 2**30:.1f} GiB"
    print(f"fit: {name} (compute capability {major}.{minor}), {free / 2**30:.1f} GiB free, {budget / 2**30:.1f} GiB "
          f"usable: device batch {rows} rows, estimated peak {need_bytes(rows) / 2**30:.1f} GiB ({why}), "
          f"{rows_per_step // rows} accumulation steps of {total_batch_size:,} tokens", flush=True)
    return rows, rows_per_step // rows


# ---------------------------------------------------------------------------
# Evaluation: the fixed metric (read-only)
# ---------------------------------------------------------------------------


def eval_rows():
    """The rows the metric scores, (EVAL_TOKENS // MAX_SEQ_LEN, MAX_SEQ_LEN + 1) tokens, and every
    token's byte length, as numpy arrays on the CPU: what the driver's scorer holds."""
    n_rows = EVAL_TOKENS // MAX_SEQ_LEN
    if n_rows == 0:
        fail(f"EVAL_TOKENS={EVAL_TOKENS} is less than one row of MAX_SEQ_LEN={MAX_SEQ_LEN} tokens")
    rows = row_slices(*load_tokens("val", Tokenizer.from_directory()), MAX_SEQ_LEN + 1, "val")
    return np.stack([np.concatenate(next(rows)[0]) for _ in range(n_rows)]), get_token_bytes().numpy()


def validation_files():
    """Every prepared file that holds validation text or tokens (the sandbox hides them from train.py):
    the val token files, the downloaded shards, and a local corpus's source files."""
    meta = read_meta(token_paths("val")[2]) or {}
    return [*token_paths("val")[:2], CACHE_DIR / "data", *(Path(f[0]) for f in meta.get("inputs", []))]


@torch.no_grad()
def evaluate_bpb(model, tokenizer, batch_size):
    """Bits per byte on the first EVAL_TOKENS // MAX_SEQ_LEN val rows, whatever batch_size is.

    Under the driver (SCORER set) the number is not computed in this process: see score_by_driver.
    Run by hand: the model is called as model(x) and returns logits (B, T, V); the cross-entropy is
    computed here, in fp32. Sum of per-token cross-entropy (nats) over targets with byte length > 0,
    divided by ln 2 times the sum of their byte lengths; special tokens count neither loss nor bytes.
    First, a causality probe on the first batch: a model whose output at a position depends on later
    tokens gets no score.
    """
    if SCORER:
        return score_by_driver(model, tokenizer, batch_size)
    n_rows = EVAL_TOKENS // MAX_SEQ_LEN
    if n_rows == 0:
        fail(f"EVAL_TOKENS={EVAL_TOKENS} is less than one row of MAX_SEQ_LEN={MAX_SEQ_LEN} tokens")
    loader = make_dataloader(tokenizer, batch_size, MAX_SEQ_LEN, "val")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    token_bytes = get_token_bytes(device)
    total_nats = torch.zeros((), dtype=torch.float64, device=device)
    total_bytes = torch.zeros((), dtype=torch.float64, device=device)
    for done in range(0, n_rows, batch_size):
        x, y, _ = next(loader)
        x, y = x[:n_rows - done], y[:n_rows - done]  # the last batch may be partial
        logits = model_logits(model, x)
        if done == 0:
            check_causal(model, x, logits, tokenizer.get_vocab_size())
        nats = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none")
        nbytes = token_bytes[y.flatten()]
        total_nats += torch.where(nbytes > 0, nats.double(), 0.0).sum()
        total_bytes += nbytes.sum()
    print("note: this val_bpb was computed in train.py's own process and is unverified; under the driver "
          "the score is computed outside the sandbox")
    return (total_nats / (math.log(2) * total_bytes)).item()


def model_logits(model, x):
    """model(x), which must be logits (B, T, vocab)."""
    logits = model(x)
    if not (isinstance(logits, torch.Tensor) and logits.dim() == 3 and logits.shape[:2] == x.shape):
        fail(f"model(x) must return logits of shape (B, T, vocab) for x of shape {tuple(x.shape)}, "
             f"got {tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}")
    return logits


def score_by_driver(model, tokenizer, batch_size):
    """Under the driver: save the weights (before any validation input is seen), then answer the
    driver's scorer, which holds the rows and their targets outside the sandbox, sends the inputs one
    batch at a time and computes the metric itself; it checks the answers of a run that could be kept
    against a fresh process that loads these weights. Returns the driver's val_bpb."""
    from safetensors.torch import save_model

    from autoresearch import scoring  # the driver's package
    save_model(getattr(model, "_orig_mod", model), str(Path(RUN_DIR) / scoring.WEIGHTS_NAME))
    cuda = torch.cuda.is_available()
    autocast = str(torch.get_autocast_dtype("cuda")).removeprefix("torch.") if cuda and \
        torch.is_autocast_enabled("cuda") else ""
    scored = []

    def score(x):
        x = torch.from_numpy(x.astype(np.int64)).to("cuda" if cuda else "cpu")
        logits = model_logits(model, x)
        if not scored:  # (a clear message early; the driver's check is what counts)
            check_causal(model, x, logits, tokenizer.get_vocab_size())
            scored.append(True)
        logp = -F.cross_entropy(logits[:, :-1].float().flatten(0, 1), x[:, 1:].flatten(), reduction="none")
        return logp.view(x.size(0), -1).cpu().numpy(), logits[:, -1].float().cpu().numpy()

    return scoring.serve(SCORER, {"batch_size": batch_size, "autocast": autocast}, score, probe_rows(model))


def probe_rows(model):
    """probe(x, positions) for the scorer: the logits at each row's position."""
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def probe(x, positions):
        x = torch.from_numpy(x.astype(np.int64)).to(device)
        logits = model_logits(model, x)
        return logits[torch.arange(x.size(0), device=device), torch.from_numpy(positions).to(device)].float().cpu().numpy()
    return probe


@torch.no_grad()
def serve_saved_model():
    """The driver's check of a run, in a fresh process: train.py's model (train.build_model) with the
    weights the run saved before it was scored, answering the scorer's probes (a row's prefix, random
    tokens after it). Usage (the driver): python -c "import prepare; prepare.serve_saved_model()"."""
    from contextlib import nullcontext

    from safetensors.torch import load_model

    import train
    from autoresearch import scoring
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, raw_model = train.build_model(Tokenizer.from_directory().get_vocab_size(), device)
    try:
        load_model(raw_model, str(Path(RUN_DIR) / scoring.WEIGHTS_NAME))
    except RuntimeError as error:
        fail(f"the weights of the model train.py scored do not load into the model train.build_model builds "
             f"({str(error).splitlines()[0]}); evaluate_bpb must score the model build_model returns")
    autocast = torch.autocast("cuda", dtype=getattr(torch, CHECK_AUTOCAST)) if CHECK_AUTOCAST else nullcontext()
    with autocast:
        scoring.serve(SCORER, {"batch_size": 0}, None, probe_rows(model))


def check_causal(model, x, logits, vocab_size):
    """Change the tokens after position t in a few rows (t = T/2, then T-2): no logit at a position
    <= t may move beyond bf16 noise, else the model reads the future and its score means nothing."""
    T = x.size(1)
    cuts = [t for t in (T // 2, T - 2)[:x.size(0)] if 0 <= t < T - 1]
    perturbed = x.clone()
    for row, t in enumerate(cuts):
        perturbed[row, t + 1:] = (x[row, t + 1:] + 1) % vocab_size
    other = model(perturbed)
    for row, t in enumerate(cuts):
        before, after = logits[row, :t + 1].float(), other[row, :t + 1].float()
        moved = (before - after).abs().amax(dim=-1)  # (t + 1,) largest change at each position
        tolerance = CAUSALITY_RTOL * before.abs().max() + 1e-6
        if (moved > tolerance).any():  # a model whose kernels are not deterministic: the same input twice
            jitter = (before - model(x)[row, :t + 1].float()).abs().amax(dim=-1)
            tolerance = torch.maximum(tolerance, 4 * jitter.max())
        if (moved > tolerance).any():
            position = int((moved > tolerance).nonzero()[0])
            fail(f"the model's output at position {position} depends on later tokens (changing the tokens "
                 f"after position {t} moved its logits by {moved[position]:.3g}); attention must stay causal")


# ---------------------------------------------------------------------------
# Main: source -> tokenizer -> token files
# ---------------------------------------------------------------------------


def warn_if_val_repeats(tokenizer):
    """Say plainly when evaluate_bpb's rows need more than one pass over the val documents."""
    tokens, offsets = load_tokens("val", tokenizer)
    doc_lens = np.diff(offsets).tolist()
    if len(tokens) > 2 * EVAL_TOKENS:
        return  # one pass is surely enough; skip counting rows
    rows = pack_rows(doc_lens, MAX_SEQ_LEN + 1, lambda epoch: epoch_order(len(doc_lens), "val", epoch))
    rows_per_pass = sum(1 for _ in itertools.takewhile(lambda row: row[1] == 1, rows))
    n_rows = EVAL_TOKENS // MAX_SEQ_LEN
    if n_rows > rows_per_pass:
        print(f"note: evaluate_bpb scores {n_rows:,} rows of {MAX_SEQ_LEN} tokens (EVAL_TOKENS="
              f"{EVAL_TOKENS:,}) but one pass over the val split ({len(tokens):,} tokens) makes only "
              f"{rows_per_pass:,}, so the val text is scored ~{n_rows / rows_per_pass:.1f} times over; "
              f"for one pass set AUTORESEARCH_EVAL_TOKENS={rows_per_pass * MAX_SEQ_LEN}, "
              "or add more text")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--num-shards", type=int, default=DEFAULT_NUM_SHARDS,
                        help=f"ClimbMix train shards to download (default {DEFAULT_NUM_SHARDS})")
    parser.add_argument("--data", nargs="+", metavar="PATH",
                        help="your own .txt/.md/.jsonl/.parquet files or folders instead of ClimbMix")
    args = parser.parse_args(argv)
    t0 = time.time()
    if args.data:
        files = list_local_files(args.data)
        source = {"local": True, "train": files, "val": files}
        print(f"local corpus: {len(files)} files, {sum(f.stat().st_size for f in files) / 1e6:,.1f} MB")
    else:
        source = download_climbmix(args.num_shards)
    tokenizer = ensure_tokenizer(source)
    meta = {}
    for split in ("val", "train"):
        meta[split] = tokens_up_to_date(split, tokenizer, describe_files(source[split]))
        if meta[split]:
            print(f"{split} tokens: up to date")
        else:
            meta[split] = tokenize_split(source, split, tokenizer)
    warn_if_val_repeats(tokenizer)
    print(f"ready in {time.time() - t0:.1f}s: {meta['train']['n_tokens']:,} train tokens "
          f"({meta['train']['n_docs']:,} documents), {meta['val']['n_tokens']:,} val tokens "
          f"({meta['val']['n_docs']:,} documents) in {CACHE_DIR}")


if __name__ == "__main__":
    main()
