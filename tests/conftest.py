"""Shared fixtures. No test ever reads or writes the user's real cache or settings."""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLE_DIR = REPO_ROOT / "tests" / "data" / "sample"
sys.path.insert(0, str(REPO_ROOT))  # the root scripts (prepare.py, ...) are importable modules


def pytest_configure(config):
    """Before any test module imports prepare: drop the user's AUTORESEARCH_* settings and
    point the cache at an empty temporary folder, so a test that forgets to ask for
    `prepared_cache` fails with "run python prepare.py" instead of using ~/.cache/autoresearch."""
    for name in [n for n in os.environ if n.startswith("AUTORESEARCH_")]:
        del os.environ[name]
    config.empty_cache_dir = tempfile.mkdtemp(prefix="autoresearch-empty-cache-")
    os.environ["AUTORESEARCH_CACHE"] = config.empty_cache_dir


def pytest_unconfigure(config):
    shutil.rmtree(getattr(config, "empty_cache_dir", ""), ignore_errors=True)


@pytest.fixture(scope="session")
def prepared_cache(tmp_path_factory):
    """A cache prepared from tests/data/sample by `python prepare.py --data` (once per session).

    Pass it on as AUTORESEARCH_CACHE (monkeypatch.setenv, or a subprocess's env); in-process
    code that already imported prepare also needs `monkeypatch.setattr(prepare, "CACHE_DIR", ...)`
    (the `prepared` fixture does both).
    """
    cache = tmp_path_factory.mktemp("prepared-cache")
    env = {**os.environ, "AUTORESEARCH_CACHE": str(cache)}
    result = subprocess.run([sys.executable, "prepare.py", "--data", str(SAMPLE_DIR)], cwd=REPO_ROOT,
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return cache


@pytest.fixture
def prepared(prepared_cache, monkeypatch):
    """The prepare module, pointed at the prepared sample cache for this test."""
    import prepare

    monkeypatch.setenv("AUTORESEARCH_CACHE", str(prepared_cache))
    monkeypatch.setattr(prepare, "CACHE_DIR", prepared_cache)
    return prepare
