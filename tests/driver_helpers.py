"""Shared fixtures for the driver tests: a fake Anthropic server, a real git repository in
tmp_path holding the driver (driver.py and the package autoresearch/) with stand-in
prepare.py / train.py, and small helpers."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fake_anthropic import FakeAnthropic

MAIN = Path(__file__).resolve().parents[1]
STANDINS = Path(__file__).resolve().parent / "standins"
sys.path.insert(0, str(MAIN))
from autoresearch import cli, llm, training  # noqa: E402

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
    monkeypatch.chdir(repo)
    return repo


STANDIN_ENV = ["--pass-env", "STANDIN_GRANDCHILD_FILE", "--pass-env", "STANDIN_ONCE_FILE",
               "--pass-env", "STANDIN_PID_FILE"]  # the stand-in's knobs reach it only when passed


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
    return cli.main(["--tag", "t", "--allow-cpu", *STANDIN_ENV, *args])


def rows(repo):
    lines = (repo / "results.tsv").read_text().splitlines()
    assert lines[0] == "commit\tval_bpb\tmemory_gb\tstatus\tdescription"
    return [dict(zip(["commit", "val_bpb", "memory_gb", "status", "description"], l.split("\t")))
            for l in lines[1:]]


def branch_log(repo):
    return git(repo, "log", "--format=%s", "autoresearch/t").splitlines()



def pid_gone(pid):
    """True once the process is gone or a zombie (killed, not yet reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] == "Z"
    except OSError:
        return True
