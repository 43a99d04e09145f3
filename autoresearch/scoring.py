"""The score is the driver's: trusted code outside the sandbox holds the validation rows and their
targets, sends the trained model the inputs one batch at a time, and computes bits per byte from
what comes back. A run that could be kept is then checked: a second, fresh process loads the
weights saved before scoring, sees only prefixes (and random continuations), and must give the
same log-probabilities at positions drawn after the first process's answers were in.

The model's side (train.py's process, through prepare.evaluate_bpb, and the checking process) is
untrusted: every message is bounded, shape- and range-checked, and a model that breaks the protocol
gets no score.

Usage: training.run_training runs a Scorer beside each run; prepare.py calls serve().
"""

import json
import math
import os
import random
import shutil
import socket
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CHECK_POSITIONS = 2048             # positions a run that could be kept is checked at (at least)
CHECK_ATOL_NATS = 0.05             # one position's log-probability may differ by this much ...
CHECK_MEAN_NATS = 0.002            # ... and their mean (the score's bias) by this much
LOGP_SLACK = 1e-3                  # a claimed log-probability above this is a probability above 1
HEADER_MAX_BYTES = 1 << 16         # one message's JSON header, at most
POLL_S = 0.5                       # how often a blocked read checks whether the session is over
WEIGHTS_NAME = "model.safetensors"  # what the model's process saves in its run directory


class ProtocolError(Exception):
    """The model's side broke the protocol (the message says how); the run gets no score."""


# ---------------------------------------------------------------------------
# Messages: a JSON header (its arrays' dtypes and shapes), then the arrays' bytes
# ---------------------------------------------------------------------------

def send(conn, header, *arrays):
    """One message: 4-byte length, JSON header naming each array's dtype and shape, the raw bytes."""
    arrays = [np.ascontiguousarray(a) for a in arrays]
    head = json.dumps({**header, "arrays": [[a.dtype.str, list(a.shape)] for a in arrays]}).encode()
    conn.sendall(struct.pack(">I", len(head)) + head)
    for a in arrays:
        conn.sendall(memoryview(a).cast("B"))


def read_exact(conn, n, stop=None):
    """n bytes from conn; polls `stop` (an Event) while waiting; EOF is a ProtocolError."""
    buf, got = bytearray(n), 0
    view = memoryview(buf)
    while got < n:
        try:
            k = conn.recv_into(view[got:], n - got)
        except socket.timeout:
            if stop is not None and stop.is_set():
                raise ProtocolError("the session ended before the model answered")
            continue
        if k == 0:
            raise ProtocolError("the model's process closed the connection mid-session")
        got += k
    return buf


def receive(conn, expect=None, stop=None):
    """(header, arrays) of one message. `expect` bounds what an untrusted peer may send: a list of
    (allowed dtypes, shape) for the arrays; anything else is a ProtocolError before it is read."""
    (size,) = struct.unpack(">I", read_exact(conn, 4, stop))
    if size > HEADER_MAX_BYTES:
        raise ProtocolError(f"a message header of {size} bytes (at most {HEADER_MAX_BYTES})")
    try:
        header = json.loads(bytes(read_exact(conn, size, stop)))
        specs = [(np.dtype(d), tuple(int(n) for n in shape)) for d, shape in header.pop("arrays")]
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        raise ProtocolError(f"an unreadable message header ({error})")
    if expect is not None:
        if len(specs) != len(expect):
            raise ProtocolError(f"{len(specs)} arrays where {len(expect)} were asked for")
        for (dtype, shape), (allowed, want) in zip(specs, expect):
            if dtype.str not in allowed or shape != tuple(want):
                raise ProtocolError(f"an array of {dtype} {shape} where {'/'.join(allowed)} {tuple(want)} was asked for")
    arrays = [np.frombuffer(read_exact(conn, dtype.itemsize * math.prod(shape), stop), dtype).reshape(shape)
              for dtype, shape in specs]
    return header, arrays


# ---------------------------------------------------------------------------
# The model's side (untrusted; in train.py's process, or the checking process)
# ---------------------------------------------------------------------------

def serve(path, hello, score, probe):
    """Connect to the driver's scorer at `path`, say `hello`, then answer until it is done:
    score(x) -> (log-probability of each next token (B, T-1), the last position's logits (B, V));
    probe(x, positions) -> the logits at each row's position (B, V). Returns the driver's val_bpb."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.connect(path)
        send(conn, {"kind": "hello", **hello})
        while True:
            header, arrays = receive(conn)
            if header["kind"] == "done":
                return header["val_bpb"]
            if header["kind"] == "score":
                send(conn, {"kind": "scores"}, *score(arrays[0]))
            elif header["kind"] == "probe":
                send(conn, {"kind": "rows"}, probe(*arrays))
            else:
                raise ProtocolError(f"unknown request {header['kind']!r}")


# ---------------------------------------------------------------------------
# The driver's side (trusted): the validation rows, the score, the check
# ---------------------------------------------------------------------------

FLOATS = ("<f4", "<f8")
_rows_cache = {}


def validation(prepare):
    """(rows (n, T+1) of the val stream, token byte lengths (V,)) from the hashed prepare.py, read
    once per process (every run of a night is scored on the same rows)."""
    key = (id(prepare), getattr(prepare, "CACHE_DIR", None))
    if key not in _rows_cache:
        rows, token_bytes = prepare.eval_rows()
        _rows_cache.clear()
        _rows_cache[key] = (np.asarray(rows), np.asarray(token_bytes, dtype=np.int64))  # (rows as stored: uint16)
    return _rows_cache[key]


def log_softmax_at(logits, targets):
    """log p(target) of each row of logits (float64, computed here: never trusted from the model)."""
    logits = np.asarray(logits, dtype=np.float64)
    top = logits.max(axis=1, keepdims=True)
    lse = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
    return logits[np.arange(len(targets)), targets] - lse


@dataclass
class Score:
    """What the scorer learned from the model's process: the score and what the check needs."""
    val_bpb: float
    nats: np.ndarray                 # (n, T) claimed nats of every target
    batch_size: int
    autocast: str
    weights: Path                    # the trusted copy of the weights saved before scoring
    weights_sha256: str
    cache: Path | None               # the compile cache as it was before scoring (sandboxed runs)


class Scorer:
    """Listens at `path` for the model's process; scores it in a thread of its own (start(), then
    finish() once the process has ended: the Score, or the reason there is none)."""

    def __init__(self, prepare, path, run_files, trusted_dir, cache_layer=None):
        self.prepare, self.path, self.run_files, self.trusted_dir = prepare, str(path), Path(run_files), Path(trusted_dir)
        self.cache_layer = cache_layer
        self.stop, self.result = threading.Event(), None
        self.error = ("no val_bpb: train.py ended without having its model scored (it must call "
                      "prepare.evaluate_bpb(model, tokenizer, batch_size) once training has ended)")
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(1)
        self.listener.settimeout(POLL_S)
        self.thread = threading.Thread(target=self.session, daemon=True)

    def start(self):
        self.thread.start()
        return self

    def finish(self, wait_s=5.0):
        """(Score, "") or (None, why): called once the model's process has ended."""
        self.thread.join(wait_s)
        self.stop.set()
        self.thread.join()
        self.listener.close()
        return (self.result, "") if self.result else (None, self.error)

    def session(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(POLL_S)
                try:
                    self.result = self.score(conn)
                except (ProtocolError, OSError) as error:  # (OSError: it closed the connection on us)
                    self.error = f"refused: the model's scoring broke the protocol: {error}"
            return

    def score(self, conn):
        """Hello (the weights are saved), then every val row's inputs, one batch at a time."""
        header, _ = receive(conn, [], self.stop)
        batch_size = header.get("batch_size")
        if header.get("kind") != "hello" or not isinstance(batch_size, int) or batch_size < 1:
            raise ProtocolError("the first message must be a hello with the batch size")
        weights, digest = copy_weights(self.run_files / WEIGHTS_NAME, self.trusted_dir)
        cache = None
        if self.cache_layer is not None:  # as it is now, before the model sees any validation input
            cache = self.trusted_dir / "compile-cache"
            shutil.copytree(self.cache_layer, cache, symlinks=True, ignore_dangling_symlinks=True)
        rows, token_bytes = validation(self.prepare)
        n, T, V = rows.shape[0], rows.shape[1] - 1, len(token_bytes)
        nats = np.empty((n, T), dtype=np.float64)
        for lo in range(0, n, batch_size):
            x, y = rows[lo:lo + batch_size, :-1], rows[lo:lo + batch_size, 1:]
            b = len(x)
            send(conn, {"kind": "score"}, x)
            _, (logp, last) = receive(conn, [(FLOATS, (b, T - 1)), (FLOATS, (b, V))], self.stop)
            logp = logp.astype(np.float64)
            if not np.isfinite(logp).all() or not np.isfinite(last).all():
                raise ProtocolError(f"a log-probability or logit that is not finite (rows {lo}-{lo + b - 1})")
            if logp.max(initial=-np.inf) > LOGP_SLACK:
                raise ProtocolError(f"a log-probability of {logp.max():.4g}, a probability above 1 "
                                    f"(rows {lo}-{lo + b - 1})")
            nats[lo:lo + b, :-1] = -logp
            nats[lo:lo + b, -1] = -log_softmax_at(last, y[:, -1])
        val_bpb = bits_per_byte(nats, rows[:, 1:], token_bytes)
        send(conn, {"kind": "done", "val_bpb": val_bpb})
        return Score(val_bpb, nats, batch_size, str(header.get("autocast") or ""), weights, digest, cache)


def bits_per_byte(nats, targets, token_bytes):
    """Sum of nats over targets of byte length > 0, over ln 2 times their bytes (prepare.py's metric)."""
    nbytes = token_bytes[targets]
    return float(np.where(nbytes > 0, nats, 0.0).sum() / (math.log(2) * nbytes.sum()))


def copy_weights(saved, trusted_dir):
    """The weights the model's process saved, copied where it cannot write, and their sha256."""
    import hashlib
    if not saved.is_file() or saved.is_symlink():
        raise ProtocolError(f"no saved weights at {saved} when scoring began")
    trusted_dir.mkdir(parents=True, exist_ok=True)
    copy, h = trusted_dir / WEIGHTS_NAME, hashlib.sha256()
    with open(saved, "rb") as src, open(copy, "wb") as dst:
        for chunk in iter(lambda: src.read(1 << 22), b""):
            h.update(chunk)
            dst.write(chunk)
    return copy, h.hexdigest()


# ---------------------------------------------------------------------------
# The check: a fresh process, the saved weights, prefixes only
# ---------------------------------------------------------------------------

def draw_probes(score, rows, token_bytes, positions=None):
    """(row, position) pairs drawn now (after the answers are in) among the scored targets, as many
    as fill whole batches of at least `positions`; and their inputs: the row's prefix up to the
    position, random tokens after it."""
    rng = random.SystemRandom()
    n, T = score.nats.shape
    want = positions or CHECK_POSITIONS
    k = -(-want // score.batch_size) * score.batch_size
    counted = np.flatnonzero(token_bytes[rows[:, 1:]].ravel() > 0)
    picks = counted[[rng.randrange(len(counted)) for _ in range(k)]]
    r, t = picks // T, picks % T
    x = rows[r, :T].copy()
    noise = np.random.default_rng(rng.getrandbits(64)).integers(0, len(token_bytes), size=x.shape)
    after = np.arange(T)[None, :] > t[:, None]
    x[after] = noise[after]
    return r, t, x


def check(score, prepare, path, launch, stop_s, positions=None):
    """Serve the probes at `path` to the process launch() starts (returns its Popen); "" when its
    log-probabilities agree with the claimed ones, else why the score is refused."""
    rows, token_bytes = validation(prepare)
    r, t, x = draw_probes(score, rows, token_bytes, positions)
    targets = rows[r, t + 1]
    V, b = len(token_bytes), score.batch_size
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    listener.settimeout(POLL_S)
    proc, stop, verified = launch(), threading.Event(), np.empty(len(r))
    timer = threading.Timer(stop_s, stop.set)
    timer.start()
    try:
        conn = accept(listener, proc, stop)
        with conn:
            conn.settimeout(POLL_S)
            receive(conn, [], stop)
            for lo in range(0, len(r), b):
                send(conn, {"kind": "probe"}, x[lo:lo + b], t[lo:lo + b].astype(np.int64))
                _, (logits,) = receive(conn, [(FLOATS, (b, V))], stop)
                if not np.isfinite(logits).all():
                    raise ProtocolError("a logit that is not finite")
                verified[lo:lo + b] = -log_softmax_at(logits, targets[lo:lo + b])
            send(conn, {"kind": "done", "val_bpb": score.val_bpb})
    except (ProtocolError, OSError) as error:
        return f"refused: the check of the score failed: the checking process {error}"
    finally:
        timer.cancel()
        listener.close()
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    return compare(score.nats[r, t], verified, r, t)


def accept(listener, proc, stop):
    """The checking process's connection (a ProtocolError if it ends or times out first)."""
    while not stop.is_set():
        try:
            return listener.accept()[0]
        except socket.timeout:
            if proc.poll() is not None:
                raise ProtocolError(f"exited (code {proc.returncode}) without connecting")
    raise ProtocolError("did not connect in time")


def compare(claimed, verified, r, t):
    """"" when the claimed nats match the fresh process's at every position and on average."""
    diff = claimed - verified  # a model that knew the answers claims fewer nats
    bad = np.flatnonzero(np.abs(diff) > CHECK_ATOL_NATS)
    if len(bad):
        i = bad[np.argmax(np.abs(diff[bad]))]
        return (f"refused: the model's outputs are not a pure function of each row's prefix and its saved "
                f"weights: at {len(bad)} of {len(diff)} positions checked, a fresh process that saw only the "
                f"prefix gave another log-probability (row {r[i]}, position {t[i]}: {-claimed[i]:.4f} scored, "
                f"{-verified[i]:.4f} from the prefix)")
    if abs(diff.mean()) > CHECK_MEAN_NATS:
        return (f"refused: the scored log-probabilities are biased against a fresh process that saw only the "
                f"prefixes: {diff.mean():+.4f} nats on average over {len(diff)} positions (at most "
                f"{CHECK_MEAN_NATS} allowed)")
    return ""


def remove(*paths):
    for p in paths:
        if p is not None:
            shutil.rmtree(p, ignore_errors=True) if Path(p).is_dir() else Path(p).unlink(missing_ok=True)


def short_socket_dir():
    """A private directory with a short path (a Unix socket's path has at most 107 bytes)."""
    import tempfile
    d = tempfile.mkdtemp(prefix="ar-")
    os.chmod(d, 0o700)
    return Path(d)
