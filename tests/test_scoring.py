"""The score is the driver's: the real train.py (small, CPU) trained, scored by the driver's scorer
and checked by a fresh process; cheating variants of it, each delivered as an ordinary edit, are
refused or score what honest code would. The protocol's guards against a model process that sends
anything at all."""

import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO_ROOT
from driver_helpers import SMALL_TRAIN

from autoresearch import sandbox, scoring, training

SETTINGS = {"max_seq_len": 128, "time_budget": 2, "eval_tokens": 16 * 128}
HOOK = 'if __name__ == "__main__":'  # each cheat goes just before main() runs

# Each cheat: code put into train.py before main() runs, as the LLM could write it.
CHEATS = {
    # patches the loss the metric used to compute in train.py's process: every target "certain"
    "patched_loss": '''
_honest_evaluate = evaluate_bpb
def evaluate_bpb(model, tokenizer, batch_size):
    F.cross_entropy = lambda logits, y, reduction="none", **kw: torch.zeros(y.shape, device=logits.device)
    return _honest_evaluate(model, tokenizer, batch_size)
''',
    # reads the next token (non-causal) only in rows >= 2, where the old causality probe never looked
    "leak_in_later_rows": '''
_honest_evaluate, _honest_forward = evaluate_bpb, GPT.forward
def _leaky_forward(self, idx, targets=None):
    logits = _honest_forward(self, idx, targets).clone()
    nxt = torch.roll(idx, -1, dims=1)
    logits[2:, :-1].scatter_add_(-1, nxt[2:, :-1, None], torch.full_like(logits[2:, :-1, :1], 20.0))
    return logits
def evaluate_bpb(model, tokenizer, batch_size):
    GPT.forward = _leaky_forward
    return _honest_evaluate(model, tokenizer, batch_size)
''',
    # honest for its first calls (the causality probe's), then copies the answers it has seen: a row
    # whose start it has seen before gets that row's continuation (the val text repeats here)
    "stateful_after_probe": '''
_honest_evaluate, _honest_forward, _calls, _seen = evaluate_bpb, GPT.forward, [], []
def _copying_forward(self, idx, targets=None):
    logits = _honest_forward(self, idx, targets).clone()
    _calls.append(1)
    if len(_calls) > 3:
        for i, row in enumerate(idx.tolist()):
            for old in _seen:
                if old[:8] == row[:8]:
                    nxt = torch.tensor(old[1:] + [old[-1]])[None, :, None]
                    logits[i:i + 1].scatter_add_(-1, nxt, torch.full(nxt.shape, 20.0))
                    break
    _seen.extend(idx.tolist())
    return logits
def evaluate_bpb(model, tokenizer, batch_size):
    GPT.forward = _copying_forward
    return _honest_evaluate(model, tokenizer, batch_size)
''',
    # reads the validation token file while it is scored, to look the next token up
    "reads_val_tokens": '''
import numpy as _np
import prepare as _prepare
_honest_evaluate = evaluate_bpb
def evaluate_bpb(model, tokenizer, batch_size):
    val = _np.fromfile(_prepare.token_paths("val")[0], dtype=_np.uint16)
    assert len(val) > 0, "the val tokens are not readable"
    raise SystemExit("read the val tokens: a lookup would follow")
''',
}


def small_train_py(extra=""):
    """train.py with small CAPS constants (2-second CPU runs), `extra` code before main() runs."""
    source = (REPO_ROOT / "train.py").read_text()
    for name, value in SMALL_TRAIN.items():
        source, n = re.subn(rf"^{name} = [^#\n]*?(\s*#|$)", rf"{name} = {value}\1", source, count=1, flags=re.M)
        assert n == 1, name
    return source.replace(HOOK, extra + "\n\n" + HOOK) if extra else source


@pytest.fixture
def small(prepared, monkeypatch):
    """prepare.py in this process at the runs' settings; fewer check positions (the protocol is the same)."""
    for key, value in SETTINGS.items():
        monkeypatch.setenv(f"AUTORESEARCH_{key.upper()}", str(value))
        monkeypatch.setattr(prepared, key.upper(), value)
    monkeypatch.setattr(scoring, "CHECK_POSITIONS", 256)
    scoring._rows_cache.clear()
    return prepared


def box():
    """The sandbox, which CI requires (here: skipped where bubblewrap cannot run)."""
    found = sandbox.choose("auto", False, REPO_ROOT)
    if not found.bwrap:
        if os.environ.get("AUTORESEARCH_REQUIRE_SANDBOX"):
            pytest.fail("bubblewrap is required here (AUTORESEARCH_REQUIRE_SANDBOX) but does not run")
        pytest.skip("bubblewrap does not run here")
    return found


def train_once(tmp_path, prepare, source, sandboxed=True, seed=42, check_below=float("inf")):
    """One run of `source` as the driver runs it; (RunResult, a folder with the weights it saved)."""
    work = tmp_path / f"work-{seed}"
    work.mkdir()
    shutil.copy(REPO_ROOT / "prepare.py", work)
    (work / "train.py").write_text(source)
    log = tmp_path / f"train-{seed}.log"
    kept = tmp_path / f"weights-{seed}"
    kept.mkdir()
    copy_weights = scoring.copy_weights

    def keeping_a_copy(saved, trusted_dir):  # (the run's own are removed with it)
        shutil.copy(saved, kept / scoring.WEIGHTS_NAME)
        return copy_weights(saved, trusted_dir)
    scoring.copy_weights = keeping_a_copy
    try:
        result = training.run_training(work, log, seed, 300, SETTINGS, tmp_path / "train.pid",
                                       sandbox=box() if sandboxed else None, cache_dir=prepare.CACHE_DIR,
                                       prepare=prepare, check_below=check_below)
    finally:
        scoring.copy_weights = copy_weights
    return result, kept


def local_metric(prepare, files):
    """prepare.evaluate_bpb in this process (no scorer) of the weights a run saved: today's metric."""
    code = ("import prepare, train, torch; from safetensors.torch import load_model; "
            "m, raw = train.build_model(prepare.Tokenizer.from_directory().get_vocab_size(), torch.device('cpu')); "
            f"load_model(raw, {str(files / scoring.WEIGHTS_NAME)!r}); "
            "print('bpb', prepare.evaluate_bpb(m, prepare.Tokenizer.from_directory(), 4))")
    env = {**os.environ, **{f"AUTORESEARCH_{k.upper()}": str(v) for k, v in SETTINGS.items()},
           "AUTORESEARCH_CACHE": str(prepare.CACHE_DIR)}
    env.pop("AUTORESEARCH_SCORER", None)
    work = files.parent / "local"
    work.mkdir(exist_ok=True)
    shutil.copy(REPO_ROOT / "prepare.py", work)
    (work / "train.py").write_text(small_train_py())
    out = subprocess.run([sys.executable, "-c", code], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    return float(re.search(r"^bpb (\S+)", out.stdout, re.M)[1])


@pytest.mark.parametrize("variant", ["honest", "lowers_eval_tokens"])
def test_the_driver_scores_the_real_model_as_the_metric_does_and_its_check_passes(small, tmp_path, variant):
    """The honest run's score (from the scorer, checked by a fresh process) equals today's metric on
    the same weights to 1e-6; a train.py that lowers EVAL_TOKENS in its process scores the same rows."""
    extra = "import prepare\nprepare.EVAL_TOKENS = 128\n" if variant == "lowers_eval_tokens" else ""
    result, files = train_once(tmp_path, small, small_train_py(extra))
    assert result.failure == "" and result.val_bpb is not None, (tmp_path / "train-42.log").read_text()[-3000:]
    assert result.val_bpb == pytest.approx(local_metric(small, files), rel=1e-6, abs=0)
    log = (tmp_path / "train-42.log").read_text()
    assert f"val_bpb:          {result.val_bpb:.6f}" in log  # train.py prints the driver's number
    assert not (tmp_path / "train-42-files" / scoring.WEIGHTS_NAME).exists()  # 140 MB a run at the defaults


@pytest.mark.parametrize("cheat", ["patched_loss", "leak_in_later_rows", "stateful_after_probe"])
def test_a_model_that_answers_better_than_its_weights_and_prefixes_allow_is_refused(small, tmp_path, cheat):
    result, _ = train_once(tmp_path, small, small_train_py(CHEATS[cheat]))
    assert result.val_bpb is None, f"{cheat} was scored {result.val_bpb}"
    assert result.failure.startswith("refused: the model's outputs are not a pure function of each row's prefix"), \
        result.failure


def test_a_cheat_that_no_keep_can_use_is_not_checked(small, tmp_path):
    """Only a run that could be kept pays for the check: a score above check_below stands unchecked."""
    result, _ = train_once(tmp_path, small, small_train_py(CHEATS["patched_loss"]), check_below=0.0)
    assert result.failure == "" and result.val_bpb is not None


def test_the_validation_data_is_not_in_the_sandbox(small, tmp_path):
    """Training on the val split, or reading the val tokens while scored: the files are not there."""
    val_source = small_train_py().replace('make_dataloader(tokenizer, device_batch, MAX_SEQ_LEN, "train")',
                                          'make_dataloader(tokenizer, device_batch, MAX_SEQ_LEN, "val")')
    assert val_source != small_train_py()
    for seed, source in ((42, val_source), (43, small_train_py(CHEATS["reads_val_tokens"]))):
        result, _ = train_once(tmp_path, small, source, seed=seed)
        assert result.val_bpb is None, f"seed {seed} scored {result.val_bpb}"
        log = (tmp_path / f"train-{seed}.log").read_text()
        assert re.search(r"no val tokens|the val tokens are not readable|Permission denied: '\S+val.bin'", log), log[-2000:]
    # without the sandbox the same file is there: the sandbox, not luck, keeps it out
    assert (small.token_paths("val")[0]).stat().st_size > 0


# ---------------------------------------------------------------------------
# The protocol: whatever the model's process sends, the scorer is not fooled and not sunk
# ---------------------------------------------------------------------------

class Rows:
    """A stand-in prepare module for the scorer: 3 rows of 5 tokens, vocabulary 4, 1 byte each."""
    CACHE_DIR = "rows"

    @staticmethod
    def eval_rows():
        return np.arange(18).reshape(3, 6) % 3 + 1, np.array([0, 1, 1, 1])


@pytest.fixture(autouse=True)
def no_folders_left_in_tmp():
    """The short folders for sockets that a test makes (scoring.short_socket_dir) are removed after it."""
    before = set(Path("/tmp").glob(f"ar-{os.getpid()}-*"))
    yield
    for d in set(Path("/tmp").glob(f"ar-{os.getpid()}-*")) - before:
        shutil.rmtree(d, ignore_errors=True)


def session(tmp_path, client, weights=True):
    """Run the scorer against `client(conn)` on a raw socket; (Score or None, why)."""
    scoring._rows_cache.clear()
    files = tmp_path / "files"
    files.mkdir(exist_ok=True)
    if weights:
        (files / scoring.WEIGHTS_NAME).write_bytes(b"weights")
    sock = session.last_path = scoring.short_socket_dir() / "s"
    scorer = scoring.Scorer(Rows, sock, files, tmp_path / "trusted").start()

    def talk():
        with socket.socket(socket.AF_UNIX) as conn:
            conn.connect(str(sock))
            try:
                client(conn)
            except (OSError, scoring.ProtocolError):
                pass  # the scorer hung up on it
    t = threading.Thread(target=talk)
    t.start()
    t.join(10)
    return scorer.finish(wait_s=1)


def hello(conn, batch_size=2):
    scoring.send(conn, {"kind": "hello", "batch_size": batch_size, "autocast": ""})


def answer(conn, logp_value=-1.0, last=None, shape=None):
    """Answer every score request with the same log-probability."""
    while True:
        header, arrays = scoring.receive(conn)
        if header["kind"] == "done":
            return header["val_bpb"]
        b, t = arrays[0].shape
        scoring.send(conn, {"kind": "scores"}, np.full(shape or (b, t - 1), logp_value),
                     np.zeros((b, 4)) if last is None else last(b))


def test_the_scorer_computes_bits_per_byte_itself(tmp_path):
    """Uniform last rows (ln 4 nats) and -1 nat elsewhere: the number is computed, not reported."""
    got = {}
    score, why = session(tmp_path, lambda c: (hello(c), got.setdefault("bpb", answer(c))))
    assert why == "" and score.nats.shape == (3, 5)
    expected = (3 * 4 * 1.0 + 3 * math.log(4)) / (math.log(2) * 15)
    assert score.val_bpb == pytest.approx(expected, rel=1e-12) and got["bpb"] == score.val_bpb


@pytest.mark.parametrize("client,says", [
    (lambda c: (hello(c), answer(c, logp_value=0.5)), "a probability above 1"),
    (lambda c: (hello(c), answer(c, logp_value=float("nan"))), "not finite"),
    (lambda c: (hello(c), answer(c, shape=(2, 9))), "where <f4/<f8 (2, 4) was asked for"),
    (lambda c: (hello(c), answer(c, last=lambda b: np.zeros((b, 3)))), "where <f4/<f8 (2, (4, 16)) was asked for"),
    (lambda c: (hello(c), answer(c, last=lambda b: np.zeros((b, 4), dtype=np.int64))), "was asked for"),
    (lambda c: c.sendall(b"\xff\xff\xff\xff"), "a message header of 4294967295 bytes"),
    (lambda c: c.sendall(b"\x00\x00\x00\x02{]"), "an unreadable message header"),
    (lambda c: scoring.send(c, {"kind": "scores"}), "the first message must be a hello"),
    (lambda c: hello(c), ""),
    (lambda c: None, "closed the connection"),
])
def test_a_model_process_that_breaks_the_protocol_gets_no_score(tmp_path, client, says):
    score, why = session(tmp_path, client)
    assert score is None and why.startswith("refused: the model's scoring broke the protocol") and says in why, why


def test_no_weights_saved_before_scoring_is_refused(tmp_path):
    score, why = session(tmp_path, lambda c: (hello(c), answer(c)), weights=False)
    assert score is None and "no saved weights" in why


def test_a_process_that_never_connects_gets_no_score(tmp_path):
    scoring._rows_cache.clear()
    scorer = scoring.Scorer(Rows, scoring.short_socket_dir() / "s", tmp_path, tmp_path / "t").start()
    score, why = scorer.finish(wait_s=0)
    assert score is None and why.startswith("no val_bpb: train.py ended without having its model scored")


def test_the_check_refuses_answers_a_fresh_process_does_not_give(tmp_path, monkeypatch):
    """The check's process answers from the prefix alone: claims that knew the next token differ."""
    monkeypatch.setattr(scoring, "CHECK_POSITIONS", 4)
    score, why = session(tmp_path, lambda c: (hello(c), answer(c, logp_value=-0.01)))
    assert why == ""
    honest = ("import numpy as np, sys; from autoresearch import scoring; "
              "scoring.serve(sys.argv[1], {}, None, lambda x, p: np.zeros((len(x), 4)))")  # uniform: ln 4 nats
    path = scoring.short_socket_dir() / "check"
    launch = lambda: subprocess.Popen([sys.executable, "-c", honest, str(path)], cwd=REPO_ROOT)  # noqa: E731
    failure = scoring.check(score, Rows, path, launch, 60)
    assert failure.startswith("refused: the model's outputs are not a pure function"), failure
    # claims that are the fresh process's own pass, and a process that never connects is refused
    score.nats[:] = np.log(4)
    path.unlink()
    assert scoring.check(score, Rows, path, launch, 60) == ""
    path.unlink()
    dead = lambda: subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])  # noqa: E731
    assert "exited (code 3) without connecting" in scoring.check(score, Rows, path, dead, 60)


def test_a_small_bias_on_every_position_is_refused():
    """Under the per-position tolerance everywhere, but biased on average: refused too."""
    claimed = np.full(1000, 2.0) - 0.01
    verified = np.full(1000, 2.0) + np.random.default_rng(0).normal(0, 1e-4, 1000)
    r = t = np.zeros(1000, dtype=int)
    assert "biased" in scoring.compare(claimed, verified, r, t)
    assert scoring.compare(verified + np.random.default_rng(1).normal(0, 1e-4, 1000), verified, r, t) == ""


def test_the_wire_format_round_trips(tmp_path):
    a, b = socket.socketpair()
    arrays = [np.arange(6, dtype=np.uint16).reshape(2, 3), np.linspace(0, 1, 4)]
    scoring.send(a, {"kind": "x", "n": 1}, *arrays)
    header, got = scoring.receive(b)
    assert header == {"kind": "x", "n": 1} and all((x == y).all() and x.dtype == y.dtype for x, y in zip(arrays, got))
    assert json.loads(json.dumps(header))


def test_a_hello_out_of_bounds_is_clamped_or_refused(tmp_path):
    """A batch larger than the rows is the rows; an autocast that is not a dtype name is refused."""
    score, why = session(tmp_path, lambda c: (hello(c, batch_size=10**12), answer(c)))
    assert why == "" and score.batch_size == 3
    bad = lambda c: scoring.send(c, {"kind": "hello", "batch_size": 2, "autocast": "bfloat16\0x"})  # noqa: E731
    score, why = session(tmp_path, bad)
    assert score is None and "autocast dtype" in why


def test_a_second_evaluate_bpb_fails_at_once_instead_of_hanging(tmp_path):
    score, why = session(tmp_path, lambda c: (hello(c), answer(c)))
    assert why == "" and not session.last_path.exists()  # the scorer's socket is gone with its session
    with socket.socket(socket.AF_UNIX) as conn, pytest.raises(OSError):
        conn.connect(str(session.last_path))


def test_what_a_run_wrote_is_copied_as_regular_files_only(tmp_path):
    """A FIFO in a run's compile cache would block a copy forever; a link could point anywhere."""
    src = tmp_path / "layer"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "kernel.py").write_text("x")
    os.mkfifo(src / "fifo")
    (src / "link").symlink_to("/etc/passwd")
    (src / "dirlink").symlink_to(tmp_path)
    copy = scoring.copy_files(src, tmp_path / "copy")
    assert sorted(str(p.relative_to(copy)) for p in copy.rglob("*")) == ["sub", "sub/kernel.py"]


def test_saved_weights_that_are_a_link_or_a_fifo_are_refused(tmp_path):
    files = tmp_path / "files"
    files.mkdir()
    secret = tmp_path / "secret"
    secret.write_text("the val tokens")
    (files / scoring.WEIGHTS_NAME).symlink_to(secret)
    with pytest.raises(scoring.ProtocolError, match="no saved weights"):
        scoring.copy_weights(files / scoring.WEIGHTS_NAME, tmp_path / "t")
    (files / scoring.WEIGHTS_NAME).unlink()
    os.mkfifo(files / scoring.WEIGHTS_NAME)
    with pytest.raises(scoring.ProtocolError, match="not a regular file"):
        scoring.copy_weights(files / scoring.WEIGHTS_NAME, tmp_path / "t")


def test_which_runs_are_checked():
    """Every run of the baseline and of the best, every repeat, and a first run that beats its
    parent or the best; a first run that does not can win nothing and is not checked."""
    from types import SimpleNamespace

    from autoresearch import loop
    from autoresearch.records import Run
    night = SimpleNamespace(groups={"parent": [1.0, 1.02], "best": [0.9]}, best_vals=[0.9])
    idea = SimpleNamespace(kind="candidate", runs=[], attempt=0, parent="parent", n=1)
    ctx = SimpleNamespace(slots=[])
    assert loop.check_below(ctx, night, idea, "candidate") == pytest.approx(1.01)
    assert loop.check_below(ctx, night, idea, "best") == float("inf")
    assert loop.check_below(ctx, night, SimpleNamespace(**{**vars(idea), "kind": "baseline"}), "candidate") == float("inf")
    idea.runs = [Run("candidate", 42, "c", 0, 1.1, 0.0, 1.0, "", "log")]
    assert loop.check_below(ctx, night, idea, "candidate") == float("inf")  # a repeat
