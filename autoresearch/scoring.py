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

import hashlib
import json
import math
import os
import random
import shutil
import signal
import socket
import stat
import struct
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CHECK_POSITIONS = 2048             # positions a run that could be kept is checked at (at least)
CHECK_ATOL_NATS = 0.05             # one position's log-probability may differ by this much ...
CHECK_MEAN_NATS = 0.002            # ... and their mean (the score's bias) by this much
LOGP_SLACK = 1e-3                  # a claimed log-probability above this is a probability above 1
HEADER_MAX_BYTES = 1 << 16         # one message's JSON header, at most
WEIGHTS_MAX_BYTES = 16 << 30       # saved weights, at most (the default model's: ~140 MB)
VOCAB_PAD_MAX = 4                  # a model's logits may be padded up to this many times the vocabulary
POLL_S = 0.5                       # how often a listener checks whether the session is over
IO_TIMEOUT_S = 5.0                 # a read polls the session's end this often; a send may stall this long
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
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError, OverflowError) as error:
        raise ProtocolError(f"an unreadable message header ({type(error).__name__})")
    if expect is not None:
        if len(specs) != len(expect):
            raise ProtocolError(f"{len(specs)} arrays where {len(expect)} were asked for")
        for (dtype, shape), (allowed, want) in zip(specs, expect):  # a (low, high) in `want`: the peer's choice
            fits = len(shape) == len(want) and all(n == w if isinstance(w, int) else w[0] <= n <= w[1]
                                                   for n, w in zip(shape, want))
            if dtype.str not in allowed or not fits:
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

_rows_lock = threading.Lock()
FLOATS = ("<f4", "<f8")
AUTOCASTS = ("", "bfloat16", "float16")  # the dtypes a model may be scored under (the check uses the same)
_rows_cache = {}


def validation(prepare):
    """(rows (n, T+1) of the val stream, token byte lengths (V,)) from the hashed prepare.py, read
    once per process (every run of a night is scored on the same rows)."""
    key = (id(prepare), getattr(prepare, "CACHE_DIR", None))
    with _rows_lock:
        if key not in _rows_cache:
            rows, token_bytes = prepare.eval_rows()
            _rows_cache.clear()
            _rows_cache[key] = (np.asarray(rows), np.asarray(token_bytes, dtype=np.int64))  # (as stored: uint16)
        return _rows_cache[key]


def log_softmax_at(logits, targets):
    """log p(target) of each row of logits (float64, computed here: never trusted from the model)."""
    logits = np.asarray(logits)
    top = logits.max(axis=1, keepdims=True)
    lse = top[:, 0].astype(np.float64) + np.log(np.exp(logits - top).sum(axis=1, dtype=np.float64))
    return logits[np.arange(len(targets)), targets].astype(np.float64) - lse


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
    width: int                       # the model's logits per position (the vocabulary, or padded)
    log_bytes: int                   # the log's size when scoring began (what it printed after may hold val inputs)


class Scorer:
    """Listens at `path` for the model's process; scores it in a thread of its own (start(), then
    finish() once the process has ended: the Score, or the reason there is none)."""

    def __init__(self, prepare, path, run_files, trusted_dir, cache_layer=None, log_path=None):
        self.prepare, self.path, self.run_files, self.trusted_dir = prepare, str(path), Path(run_files), Path(trusted_dir)
        self.cache_layer, self.log_path = cache_layer, log_path
        self.stop, self.result, self.began = threading.Event(), None, False  # began: a connection came
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
        return (self.result, "") if self.result else (None, self.error)

    def session(self):
        """One connection, scored; then nobody else may connect (a second evaluate_bpb fails at once)."""
        try:
            while not self.stop.is_set():
                try:
                    conn, _ = self.listener.accept()
                except socket.timeout:
                    continue
                self.began = True
                with conn:
                    conn.settimeout(IO_TIMEOUT_S)
                    try:
                        self.result = self.score(conn)
                    except (ProtocolError, OSError) as error:  # (OSError: it closed the connection on us)
                        self.error = f"refused: the model's scoring broke the protocol: {error}"
                    except (Exception, SystemExit) as error:  # noqa: BLE001 (the driver's side: say so, go on)
                        self.error = f"the driver could not score the run: {type(error).__name__}: {error}"
                return
        finally:
            self.listener.close()
            Path(self.path).unlink(missing_ok=True)

    def score(self, conn):
        """Hello (the weights are saved), then every val row's inputs, one batch at a time."""
        header, _ = receive(conn, [], self.stop)
        log_bytes = os.path.getsize(self.log_path) if self.log_path else 0
        batch_size, autocast = header.get("batch_size"), header.get("autocast")
        if header.get("kind") != "hello" or type(batch_size) is not int or batch_size < 1 or autocast not in AUTOCASTS:
            raise ProtocolError(f"the first message must be a hello with the batch size and an autocast dtype "
                                f"({', '.join(map(repr, AUTOCASTS))})")
        weights, digest = copy_weights(self.run_files / WEIGHTS_NAME, self.trusted_dir)
        cache = None
        if self.cache_layer is not None:  # as it is now, before the model sees any validation input
            cache = copy_files(self.cache_layer, self.trusted_dir / "compile-cache")
        rows, token_bytes = validation(self.prepare)
        n, T, V = rows.shape[0], rows.shape[1] - 1, len(token_bytes)
        batch_size, width = min(batch_size, n), (V, VOCAB_PAD_MAX * V)
        nats = np.empty((n, T), dtype=np.float64)
        send(conn, {"kind": "score"}, rows[:batch_size, :-1])
        for lo in range(0, n, batch_size):
            y = rows[lo:lo + batch_size, 1:]
            b = len(y)
            _, (logp, last) = receive(conn, [(FLOATS, (b, T - 1)), (FLOATS, (b, width))], self.stop)
            if lo + batch_size < n:  # the next batch goes out now (this one is answered): checked while it runs
                send(conn, {"kind": "score"}, rows[lo + batch_size:lo + 2 * batch_size, :-1])
            width = last.shape[1]  # (the first answer fixes it)
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
        return Score(val_bpb, nats, batch_size, autocast, weights, digest, cache, width, log_bytes)


def bits_per_byte(nats, targets, token_bytes):
    """Sum of nats over targets of byte length > 0, over ln 2 times their bytes (prepare.py's metric)."""
    nbytes = token_bytes[targets]
    return float(np.where(nbytes > 0, nats, 0.0).sum() / (math.log(2) * nbytes.sum()))


COPY_DEPTH = 32                    # a compile cache is a few folders deep; a run's folder deeper is left out
NOFOLLOW = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)


def copy_files(src, dst):
    """A copy of the regular files and folders under src, which a run wrote and may still be changing:
    every file and folder is opened without following links and checked once open (a link swapped
    in after a listing, a FIFO, a device, what lies deeper than COPY_DEPTH: left out); returns dst."""
    def copy_dir(src_fd, dst_path, depth):
        os.mkdir(dst_path, 0o700)
        for entry in list(os.scandir(src_fd)):
            try:
                fd = os.open(entry.name, NOFOLLOW, dir_fd=src_fd)
            except OSError:
                continue  # a link, or gone
            try:
                kind = os.fstat(fd).st_mode
                if stat.S_ISDIR(kind) and depth < COPY_DEPTH:
                    copy_dir(fd, os.path.join(dst_path, entry.name), depth + 1)
                elif stat.S_ISREG(kind):
                    with open(fd, "rb", closefd=False) as f, open(os.path.join(dst_path, entry.name), "wb") as out:
                        shutil.copyfileobj(f, out, 1 << 22)
            finally:
                os.close(fd)
    root = os.open(src, NOFOLLOW | os.O_DIRECTORY)
    try:
        copy_dir(root, dst, 0)
    finally:
        os.close(root)
    return Path(dst)


def copy_weights(saved, trusted_dir):
    """The weights the model's process saved, copied where it cannot write (opened without following
    a link, a regular file of bounded size), and their sha256."""
    try:
        fd = os.open(saved, NOFOLLOW)
    except OSError:
        raise ProtocolError(f"no saved weights (a regular file) at {saved} when scoring began")
    with os.fdopen(fd, "rb") as src:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > WEIGHTS_MAX_BYTES:
            raise ProtocolError(f"the saved weights at {saved} are not a regular file of at most "
                                f"{WEIGHTS_MAX_BYTES >> 30} GiB")
        trusted_dir.mkdir(parents=True, exist_ok=True)
        copy, h, left = trusted_dir / WEIGHTS_NAME, hashlib.sha256(), WEIGHTS_MAX_BYTES
        with open(copy, "wb") as dst:
            while chunk := src.read(min(1 << 22, left + 1)):
                left -= len(chunk)
                if left < 0:
                    raise ProtocolError(f"the saved weights grew past {WEIGHTS_MAX_BYTES >> 30} GiB while copied")
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
    k = -(-want // probe_batch(score, want)) * probe_batch(score, want)
    counted = np.flatnonzero(token_bytes[rows[:, 1:]].ravel() > 0)
    picks = counted[[rng.randrange(len(counted)) for _ in range(k)]] if len(counted) else counted
    r, t = picks // T, picks % T
    x = rows[r, :T].copy()
    noise = np.random.default_rng(rng.getrandbits(64)).integers(0, len(token_bytes), size=x.shape)
    after = np.arange(T)[None, :] > t[:, None]
    x[after] = noise[after]
    return r, t, x


def probe_batch(score, want):
    """The check's batch: the scoring batch (the same kernels), unless that is more than the probes."""
    return min(score.batch_size, want)


def check(score, prepare, path, launch, stop_s, positions=None):
    """Serve the probes at `path` (in a folder no run can write) to the process launch() starts
    (returns its Popen, a process group of its own); "" when its log-probabilities agree with the
    claimed ones, else why the score is refused."""
    rows, token_bytes = validation(prepare)
    r, t, x = draw_probes(score, rows, token_bytes, positions)
    if not len(r):
        return ""  # no target is scored (every one has 0 bytes): nothing a model could gain
    targets, b = rows[r, t + 1].astype(np.int64), probe_batch(score, positions or CHECK_POSITIONS)
    stop, verified, proc, listener = threading.Event(), np.empty(len(r)), None, None
    timer = threading.Timer(stop_s, stop.set)
    timer.daemon = True  # (never what keeps a stopping driver alive)
    timer.start()
    try:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(path))
        listener.listen(1)
        listener.settimeout(POLL_S)
        proc = launch()
        conn = accept(listener, proc, stop)
        with conn:
            conn.settimeout(IO_TIMEOUT_S)
            receive(conn, [], stop)
            for lo in range(0, len(r), b):
                send(conn, {"kind": "probe"}, x[lo:lo + b], t[lo:lo + b].astype(np.int64))
                _, (logits,) = receive(conn, [(FLOATS, (b, score.width))], stop)
                if not np.isfinite(logits).all():
                    raise ProtocolError("sent a logit that is not finite")
                verified[lo:lo + b] = -log_softmax_at(logits, targets[lo:lo + b])
            send(conn, {"kind": "done", "val_bpb": score.val_bpb})
    except (ProtocolError, OSError) as error:
        return f"refused: the check of the score failed: the checking process {error}"
    finally:
        timer.cancel()
        if listener is not None:
            listener.close()
        if proc is not None:
            end_group(proc)
    return compare(score.nats[r, t], verified, r, t)


def end_group(proc, grace_s=15.0):
    """End a process group of its own (the checking process's supervisor, which ends whatever it
    started): SIGTERM, then SIGKILL after grace_s."""
    for signum in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, signum)
            proc.wait(timeout=grace_s)
            return
        except (ProcessLookupError, PermissionError):
            break
        except subprocess.TimeoutExpired:
            pass
    proc.wait()


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
    """Remove files and folders that a run wrote: also a folder nested thousands deep (past Python's
    recursion) or one its owner made unreadable (rm, after chmod)."""
    for p in paths:
        if p is None or not os.path.lexists(p):
            continue
        if not Path(p).is_dir() or Path(p).is_symlink():
            Path(p).unlink(missing_ok=True)
            continue
        try:
            shutil.rmtree(p)
        except (OSError, RecursionError):
            subprocess.run(["chmod", "-R", "u+rwX", str(p)], capture_output=True)
            subprocess.run(["rm", "-rf", "--one-file-system", str(p)], capture_output=True)


def short_socket_dir():
    """A private directory in /tmp, which every sandbox replaces with its own (so no run sees another
    run's), with a short path (a Unix socket's path has at most 107 bytes) that names this process."""
    return Path(tempfile.mkdtemp(prefix=f"ar-{os.getpid()}-", dir="/tmp"))


def remove_stale_dirs():
    """The folders (weights, cache copies) that a driver killed with -9 left in /tmp."""
    for d in Path("/tmp").glob("ar-*-*"):
        pid = d.name.split("-")[1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            remove(d)
