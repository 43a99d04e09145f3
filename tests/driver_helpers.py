"""Shared fixtures for the driver tests: a fake Anthropic server, a real git repository in
tmp_path holding the driver (driver.py and the package autoresearch/) with stand-in
prepare.py / train.py, and small helpers."""

import contextlib
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fake_anthropic import FakeAnthropic
from fake_openai import FakeOpenAI

MAIN = Path(__file__).resolve().parents[1]
STANDINS = Path(__file__).resolve().parent / "standins"
sys.path.insert(0, str(MAIN))
from autoresearch import cli, llm, scoring, training  # noqa: E402

BASE_LINE = "TRUE_BPB = 1.000000"
MODE_LINE = 'MODE = "ok"'
def git(repo, *args):
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture
def fake():
    server = FakeAnthropic()
    yield server
    server.close()


@pytest.fixture
def repo(tmp_path, fake, monkeypatch):
    """A git repo holding the driver, the stand-in prepare.py/train.py and program.md; prepared
    stand-in data in tmp_path/cache; the environment pointed at the fake server."""
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(MAIN / "driver.py", repo)
    shutil.copytree(MAIN / "autoresearch", repo / "autoresearch", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(MAIN / ".gitignore", repo)
    shutil.copy(STANDINS / "prepare.py", repo)
    shutil.copy(STANDINS / "train.py", repo)
    (repo / "program.md").write_text("Lower val_bpb. One idea per experiment.\n")
    git(repo, "init", "-q", "-b", "master")
    git(repo, "config", "user.email", "t@example.com")
    git(repo, "config", "user.name", "Test")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "initial")
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "val.bin").write_bytes(b"validation tokens")
    (cache / "token_bytes.bin").write_bytes(b"byte lengths")
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(cache))
    monkeypatch.setenv("AUTORESEARCH_TIME_BUDGET", "5")
    monkeypatch.setenv("ANTHROPIC_BASE_URL", fake.url)
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test-secret")
    monkeypatch.delenv("AUTORESEARCH_MODEL", raising=False)
    monkeypatch.setattr(llm, "LLM_BACKOFF_S", 0.01)
    monkeypatch.setattr(training, "KILL_GRACE_S", 0.5)
    monkeypatch.setattr(scoring, "CHECK_POSITIONS", 64)  # (fewer probes, the same protocol: faster tests)
    monkeypatch.chdir(repo)
    return repo


# the stand-in's knobs reach it only when passed
STANDIN_ENV = ["--pass-env", "STANDIN_GRANDCHILD_FILE", "--pass-env", "STANDIN_ONCE_FILE", "--pass-env",
               "STANDIN_PID_FILE", "--pass-env", "STANDIN_WRITE_DIR", "--pass-env", "STANDIN_SECRET_TEXT"]
# CPU, no sandbox (the stand-in writes its pid and marker files into tmp_path; test_sandbox.py
# runs with --sandbox on), one experiment at a time (the scripted LLM replies follow the best;
# test_pipeline.py runs the pipeline)
DRIVER_ARGS = ["--allow-cpu", "--sandbox", "off", "--pipeline", "off", *STANDIN_ENV]


@pytest.fixture
def server():
    """Serving OpenAI's Chat Completions, like Ollama on its port (no key needed): server(**options)."""
    fakes = []

    def start(**options):
        fakes.append(FakeOpenAI(**options))
        return fakes[-1]
    yield start
    for f in fakes:
        f.close()


def run_openai(fake_server, *args):
    """The driver in-process against a fake OpenAI-compatible server."""
    return cli.main(["--tag", "t", *DRIVER_ARGS, "--provider", "openai", "--base-url", fake_server.url,
                     "--model", "local-model", *args])


@pytest.fixture
def noisy(repo):
    """The repo's train.py with run-to-run noise of 0.001 bpb (sigma), committed."""
    path = repo / "train.py"
    path.write_text(path.read_text().replace("NOISE_STD = 0.0", "NOISE_STD = 0.001"))
    git(repo, "commit", "-q", "-am", "noisy stand-in")
    return repo


def journal(repo):
    return json.loads((repo / "runs/t/journal.json").read_text())


def run(*args):
    """The driver in-process on the test repo (CPU: --allow-cpu)."""
    return cli.main(["--tag", "t", *DRIVER_ARGS, *args])


def rows(repo):
    lines = (repo / "results.tsv").read_text().splitlines()
    assert lines[0] == "commit\tval_bpb\tmemory_gb\tstatus\tdescription"
    return [dict(zip(["commit", "val_bpb", "memory_gb", "status", "description"], l.split("\t")))
            for l in lines[1:]]


def branch_log(repo):
    return git(repo, "log", "--format=%s", "autoresearch/t").splitlines()



@contextlib.contextmanager
def stop_signals_handled():
    """While a driver process is started: SIGINT, SIGTERM and SIGHUP handled here, so the child starts
    with them at their defaults, as from a terminal, even where the tests run as a background job or
    under nohup (a child inherits an ignored signal; a handled one starts at its default)."""
    stops = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {s: signal.signal(s, signal.default_int_handler) for s in stops}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def exit_code(proc, out, timeout_s=30):
    """The driver process's exit code; if it has not exited in time, every thread's stack (SIGUSR1)
    in the failure, so a rare hang says where it was."""
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGUSR1)
        time.sleep(2)
        proc.kill()
        proc.wait()
        pytest.fail(f"the driver had not exited {timeout_s} s after the signal; its output:\n{out.read_text()[-6000:]}")


def pid_gone(pid):
    """True once the process is gone or a zombie (killed, not yet reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] == "Z"
    except OSError:
        return True


# ---------------------------------------------------------------------------
# The real train.py and prepare.py in the test repository (CPU, small settings)
# ---------------------------------------------------------------------------

SMALL_TRAIN = {"DEPTH": "2", "ASPECT_RATIO": "32", "HEAD_DIM": "32", "TOTAL_BATCH_SIZE": "1024", "WARMUP_STEPS": "2",
               "DEVICE_BATCH_SIZE": "4"}


def use_real_train_py(repo, prepared_cache, monkeypatch):
    """Commit the real prepare.py and train.py (small CAPS constants) in the repo, settings for a
    2-second CPU run; returns train.py's MATRIX_LR line (for an edit)."""
    shutil.copy(MAIN / "prepare.py", repo)
    source = (MAIN / "train.py").read_text()
    for name, value in SMALL_TRAIN.items():
        source, n = re.subn(rf"^{name} = [^#\n]*?(\s*#|$)", rf"{name} = {value}\1", source, count=1, flags=re.M)
        assert n == 1, f"{name} not found in train.py"
    (repo / "train.py").write_text(source)
    git(repo, "commit", "-q", "-am", "real train.py, small")
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(prepared_cache))
    monkeypatch.setenv("AUTORESEARCH_MAX_SEQ_LEN", "128")
    monkeypatch.setenv("AUTORESEARCH_TIME_BUDGET", "2")
    monkeypatch.setenv("AUTORESEARCH_EVAL_TOKENS", str(16 * 128))
    return next(line for line in source.splitlines() if line.startswith("MATRIX_LR = "))


def check_real_runs(repo, fake):
    """The baseline kept, the LLM's edit run and decided, both with plausible val_bpb."""
    r = rows(repo)
    assert r[0]["status"] == "keep", (repo / "runs/t/0000/train.log").read_text()[-3000:]
    assert r[1]["status"] in ("keep", "discard"), (repo / "runs/t/0001/train.log").read_text()[-3000:]
    assert all(0 < float(x["val_bpb"]) < 20 for x in r)
    assert "MATRIX_LR = 0.03" in (repo / "runs/t/0001/diff.patch").read_text()
    system = json.dumps(fake.requests[0]["system"])
    assert "TIME_BUDGET = " in system and "def make_dataloader" in system
