"""The sandbox around training runs (issue 9): bubblewrap with its own PID namespace, no network,
read-only files but the run's own directory and the compile cache. These tests need a working
bwrap; CI installs it and sets AUTORESEARCH_REQUIRE_SANDBOX=1, so there they fail instead of
skipping. Run: python -m pytest tests/test_sandbox.py"""

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from driver_helpers import (BASE_LINE, MAIN, MODE_LINE, STANDIN_ENV, check_real_runs, fake, repo, rows,  # noqa: F401
                            use_real_train_py)
from fake_anthropic import edit
from autoresearch import cli, sandbox

WORKS = bool(shutil.which("bwrap")) and not sandbox.probe(sandbox.Sandbox(shutil.which("bwrap")), MAIN)
needs_bwrap = pytest.mark.skipif(not WORKS and not os.environ.get("AUTORESEARCH_REQUIRE_SANDBOX"),
                                 reason="bubblewrap is not installed or does not work here")


def run(*args):
    return cli.main(["--tag", "t", "--allow-cpu", *STANDIN_ENV, *args])


@pytest.fixture
def secret_holder():
    """A process of this user with the driver's secret in its environment (the in-process driver's
    own /proc/<pid>/environ shows the environment pytest started with)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"],
                            env={**os.environ, "ANTHROPIC_API_KEY": "sk-ant-test-secret"})
    yield proc.pid
    proc.kill()
    proc.wait()


@pytest.fixture
def home_secret(monkeypatch):
    """A private key in the home folder of the user the driver runs as (root's in CI)."""
    folder = Path.home() / f".autoresearch-test-{os.getpid()}"
    folder.mkdir()
    (folder / "id_ed25519").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nhome-secret\n")
    monkeypatch.setenv("STANDIN_HOME_SECRET", str(folder / "id_ed25519"))
    yield folder / "id_ed25519"
    shutil.rmtree(folder)


@pytest.fixture
def run_socket(monkeypatch):
    """A service's Unix socket in /run (where the Docker and systemd sockets are), listening."""
    folder = Path(f"/run/autoresearch-test-{os.getpid()}")
    try:
        folder.mkdir()
    except OSError:
        pytest.skip("/run is not writable here (not root)")
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(folder / "s"))
    server.listen(5)
    monkeypatch.setenv("STANDIN_RUN_SOCKET", str(folder / "s"))
    yield folder / "s"
    server.close()
    shutil.rmtree(folder)


@pytest.fixture
def listener():
    """A TCP server on loopback that the sandboxed train.py must not reach."""
    server = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=lambda: [server.accept() for _ in range(10)], daemon=True).start()
    yield server.getsockname()[1]
    server.close()


def probe_report(repo, experiment="0001"):
    log = (repo / f"runs/t/{experiment}/train.log").read_text()
    return json.loads(log.split("sandbox-probe: ")[1].split("\n")[0])


@needs_bwrap
def test_a_sandboxed_train_py_reaches_nothing_but_its_run_directory(repo, fake, listener, secret_holder, home_secret,
                                                                   run_socket, monkeypatch, capsys):
    """Also as root (CI runs the tests as root): no capability is left to remount, unmount /proc (the
    host's beneath it), mount another, or enter a namespace; no hook or config can be planted for the
    driver's git; program.md stays as it is; nothing in the home folder is there."""
    monkeypatch.setenv("STANDIN_PORT", str(listener))
    monkeypatch.setenv("STANDIN_SANDBOXED", "1")
    fake.replies += [edit("probe", (MODE_LINE, 'MODE = "probe_sandbox"'), (BASE_LINE, "TRUE_BPB = 0.990000"))]
    assert run("--max-experiments", "1", "--greedy", "--sandbox", "on", "--pass-env", "STANDIN_PORT",
               "--pass-env", "STANDIN_SANDBOXED", "--pass-env", "STANDIN_HOME_SECRET", "--pass-env",
               "STANDIN_RUN_SOCKET") == 0
    assert probe_report(repo) == {
        "secret_in_env": False, "secret_in_proc": False, "write_results_tsv": False, "write_journal": False,
        "write_git": False, "write_prepare_py": False, "write_tokens": False, "write_experiment_dir": False,
        "write_run_dir": True, "write_compile_cache": True, "read_val": False, "read_logs": False,
        "remount_root": False, "tcp_loopback": False, "write_program_md": False, "write_git_hook": False,
        "write_git_config": False, "read_home": False, "connect_run_socket": False, "remount_root_libc": False,
        "umount_proc": False, "mount_proc": False, "setns_net": False}
    assert [x["status"] for x in rows(repo)] == ["keep", "keep"]  # it trained and printed its summary
    out = capsys.readouterr().out
    assert "sandbox bubblewrap, no network" in out


@needs_bwrap
def test_the_same_train_py_without_the_sandbox_reaches_everything(repo, fake, listener, secret_holder, home_secret,
                                                                  run_socket, monkeypatch):
    """The probe can tell: unsandboxed, the driver's secret and its records are within reach. The
    hook and the git config command it plants never run (the driver's git runs no hooks, and the
    config is put back), and the run is refused for it."""
    monkeypatch.setenv("STANDIN_PORT", str(listener))
    fake.replies += [edit("probe", (MODE_LINE, 'MODE = "probe_sandbox"'), (BASE_LINE, "TRUE_BPB = 0.990000"))]
    assert run("--max-experiments", "1", "--greedy", "--sandbox", "off", "--fix-attempts", "0",
               "--pass-env", "STANDIN_PORT", "--pass-env", "STANDIN_HOME_SECRET", "--pass-env", "STANDIN_RUN_SOCKET") == 0
    report = probe_report(repo)
    assert report["secret_in_proc"] and report["write_results_tsv"] and report["write_journal"]
    assert report["write_prepare_py"] and report["tcp_loopback"] and report["read_val"] and report["read_logs"]
    assert report["read_home"] and report["write_git_hook"] and report["write_git_config"]
    assert report["connect_run_socket"]
    assert not (repo / "planted-command-ran").exists()  # neither ran in the driver's git commands
    assert "fsmonitor" not in (repo / ".git/config").read_text()
    r = rows(repo)[1]
    assert r["status"] == "crash" and "train.py changed git's config" in r["description"]


@needs_bwrap
def test_allow_network_lets_the_sandboxed_run_connect(repo, fake, listener, secret_holder, monkeypatch):
    monkeypatch.setenv("STANDIN_PORT", str(listener))
    fake.replies += [edit("probe", (MODE_LINE, 'MODE = "probe_sandbox"'), (BASE_LINE, "TRUE_BPB = 0.990000"))]
    assert run("--max-experiments", "1", "--greedy", "--sandbox", "on", "--allow-network",
               "--pass-env", "STANDIN_PORT") == 0
    report = probe_report(repo)
    assert report["tcp_loopback"] and not report["secret_in_proc"] and not report["write_results_tsv"]
    assert "sandbox: bubblewrap, network allowed" in cli.report(repo / "results.tsv", repo / "runs/t/journal.json")


def test_sandbox_on_refuses_to_start_without_a_working_bwrap(repo, fake, monkeypatch):
    monkeypatch.setattr(sandbox, "BWRAP", "no-such-bwrap")
    with pytest.raises(SystemExit, match="--sandbox on, but the sandbox does not work here: no-such-bwrap is "
                                         "not installed; install bubblewrap"):
        run("--max-experiments", "0", "--greedy", "--sandbox", "on")
    assert not (repo / "runs/t").exists()


def test_auto_degrades_to_off_with_one_line_when_the_probe_fails(repo, fake, monkeypatch, capsys):
    monkeypatch.setattr(sandbox, "BWRAP", "false")  # installed, but fails (no user namespaces, say)
    assert run("--max-experiments", "0", "--greedy", "--sandbox", "auto") == 0
    out = capsys.readouterr().out
    assert "note: training runs are NOT sandboxed (false failed: exit code 1); install bubblewrap" in out
    assert "sandbox off" in out and [x["status"] for x in rows(repo)] == ["keep"]


@needs_bwrap
def test_the_real_train_py_trains_inside_the_sandbox_on_cpu(repo, fake, prepared_cache, monkeypatch):
    lr_line = use_real_train_py(repo, prepared_cache, monkeypatch)
    fake.replies += [edit("lower Muon lr", (lr_line, lr_line.replace("MATRIX_LR = 0.04", "MATRIX_LR = 0.03")))]
    assert run("--max-experiments", "1", "--greedy", "--timeout", "300", "--fix-attempts", "0", "--sandbox", "on") == 0
    check_real_runs(repo, fake)


@needs_bwrap
@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the probe's answer without a GPU")
def test_the_probe_looks_for_the_gpu_inside_when_the_driver_has_one():
    bwrap = sandbox.Sandbox(shutil.which("bwrap"))
    assert sandbox.probe(bwrap, MAIN) == ""
    assert "Torch not compiled with CUDA enabled" in sandbox.probe(bwrap, MAIN, cuda=True)  # (a CPU build)


@needs_bwrap
def test_nothing_a_run_writes_into_the_compile_cache_reaches_a_later_run(repo, fake, capsys, monkeypatch):
    """Each run compiles into its own copy of the cache that the baseline filled: a poisoned entry
    (a rewritten kernel, a new file) is gone for the next run, the baseline's entry is there; what
    the checking process (which sees validation prefixes) writes reaches no run either."""
    monkeypatch.setenv("STANDIN_CHECK_WRITES", "1")
    (repo / "train.py").write_text((repo / "train.py").read_text().replace(MODE_LINE, 'MODE = "fill_cache"'))
    subprocess.run(["git", "commit", "-qam", "a baseline that compiles"], cwd=repo, check=True)
    fake.replies += [edit("poison", ('MODE = "fill_cache"', 'MODE = "poison_cache"')),
                     edit("read", ('MODE = "fill_cache"', 'MODE = "read_cache"'), (BASE_LINE, "TRUE_BPB = 0.990000"))]
    assert run("--max-experiments", "2", "--greedy", "--sandbox", "on", "--pass-env", "STANDIN_CHECK_WRITES") == 0
    log = (repo / "runs/t/0002/train.log").read_text()
    assert json.loads(log.split("cache: ")[1].split("\n")[0]) == {"kernel-baseline.py": "# compiled"}
    cache = repo.parent / "cache" / "torchinductor"
    assert sorted(f.name for f in cache.iterdir()) == ["kernel-baseline.py", "triton-home"]
    assert (cache / "kernel-baseline.py").read_text() == "# compiled"
    # a cache changed behind the driver's back (a run without the sandbox, a person) is not used
    (cache / "kernel-baseline.py").write_text("CHEAT = True")
    fake.replies += [edit("read again", ('TRUE_BPB = 0.990000', "TRUE_BPB = 0.980000"))]
    assert run("--max-experiments", "3", "--greedy", "--sandbox", "on", "--pass-env", "STANDIN_CHECK_WRITES") == 0
    assert "changed since a trusted run filled it" in capsys.readouterr().out
    assert "cache: {}" in (repo / "runs/t/0003/train.log").read_text()


@needs_bwrap
def test_inside_the_sandbox_what_a_run_writes_to_tmp_counts_and_its_tmp_is_removed(repo, fake, monkeypatch):
    monkeypatch.setenv("STANDIN_WRITE_DIR", "/tmp")
    fake.replies += [edit("fills /tmp", (MODE_LINE, 'MODE = "write_big"'))]
    assert run("--max-experiments", "1", "--greedy", "--sandbox", "on", "--fix-attempts", "0",
               "--run-limits", "written=2M") == 0
    r = rows(repo)
    assert r[1]["status"] == "crash" and "stopped at a limit: it wrote more than 2 MiB" in r[1]["description"]
    assert not (repo / "runs/t/0001/train-tmp").exists()


@needs_bwrap
def test_results_tsv_deleted_by_a_person_during_a_sandboxed_run_blames_no_run(repo, fake, capsys):
    """In the sandbox the run could not have: the file is rebuilt and the run counts."""
    fake.replies += [edit("slow", ("SLEEP_S = 0.0", "SLEEP_S = 3.0"), (BASE_LINE, "TRUE_BPB = 0.990000"))]

    def person():
        deadline = time.time() + 60
        while time.time() < deadline and not (repo / "runs/t/0001/train.log").exists():
            time.sleep(0.05)
        time.sleep(1.0)
        (repo / "results.tsv").unlink()
    thread = threading.Thread(target=person, daemon=True)
    thread.start()
    assert run("--max-experiments", "1", "--greedy", "--sandbox", "on") == 0
    thread.join()
    assert [(x["description"], x["status"]) for x in rows(repo)] == [("baseline", "keep"), ("slow", "keep")]
    assert "results.tsv was deleted" in capsys.readouterr().out


@needs_bwrap
def test_a_home_folder_inside_tmp_leaves_the_sandbox_working(monkeypatch, tmp_path):
    """HOME=/tmp/... (CI jobs, clusters): /tmp is the run's own already, not emptied twice."""
    monkeypatch.setenv("HOME", str(tmp_path))
    assert sandbox.probe(sandbox.Sandbox(shutil.which("bwrap")), MAIN) == ""
    monkeypatch.setenv("HOME", "/tmp")
    assert sandbox.probe(sandbox.Sandbox(shutil.which("bwrap")), MAIN) == ""
