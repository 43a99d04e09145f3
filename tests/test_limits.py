"""What one run may use (issue 19): a file's size, the bytes it writes, what it prints, its
processes; a run past a limit is a crash row that says which, its files removed and its log kept.
And every process a run starts ends with it (the supervisor is a subreaper), and what the model is
sent of a failed run's log is bounded and holds no key."""

import json
import os
import subprocess
import sys
import time

import pytest

from driver_helpers import MODE_LINE, fake, pid_gone, repo, rows, run  # noqa: F401
from fake_anthropic import edit
from autoresearch import prompt, scoring, supervise, training

LIMITS = {"file": 1 << 30, "written": 1 << 30, "output": 1 << 30, "processes": 100, "tasks": 4000, "grace_s": 2.0}


def supervised(tmp_path, code, **limits):
    """`code` run under the supervisor: (exit code, the reason in its report, its output)."""
    (tmp_path / "w").mkdir(exist_ok=True)
    config = {**LIMITS, **limits, "report": str(tmp_path / "report"), "log": str(tmp_path / "log"),
              "watch": [str(tmp_path / "w")], "parent": None}
    with open(tmp_path / "log", "wb") as log:
        proc = subprocess.run([sys.executable, str(training.SUPERVISE), json.dumps(config), "--", sys.executable, "-c",
                               code], stdout=log, stderr=subprocess.STDOUT, start_new_session=True, timeout=120)
    report = tmp_path / "report"
    return proc.returncode, report.read_text() if report.exists() else "", (tmp_path / "log").read_bytes()[-2000:]


def test_the_supervisor_passes_the_exit_code_and_ends_a_daemon_in_a_session_of_its_own(tmp_path):
    daemon = ("import os, subprocess, sys\n"
              "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], start_new_session=True)\n"
              f"open({str(tmp_path / 'pid')!r}, 'w').write(str(p.pid))\n"
              "sys.exit(3)")
    code, why, _ = supervised(tmp_path, daemon)
    assert (code, why) == (3, "")
    assert pid_gone(int((tmp_path / "pid").read_text()))


@pytest.mark.parametrize("code, limits, expected", [
    ("f = open('w/big', 'wb')\nwhile True: f.write(b'x' * (1 << 20))", {"written": 8 << 20, "file": 1 << 40},
     "it wrote more than 8 MiB into its run directory and /tmp (the limit on bytes written)"),
    ("f = open('w/big', 'wb')\nwhile True: f.write(b'x' * (1 << 20))", {"file": 4 << 20},
     "it wrote a file of 4 MiB or more (the limit on a file's size)"),
    ("import sys\nwhile True: sys.stdout.write('y' * (1 << 20))", {"output": 8 << 20},
     "it printed more than 8 MiB (the limit on output)"),
    ("import subprocess, sys, time\n"
     "ps = [subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']) for _ in range(60)]\n"
     "time.sleep(600)", {"processes": 20}, "it ran more than 20 processes at once (the limit on processes)"),
    ("import threading, time\n"  # threads: the cgroup refuses the 101st, or the count sees them
     "for _ in range(300):\n"
     "    threading.Thread(target=time.sleep, args=(600,), daemon=True).start()\n"
     "time.sleep(600)", {"tasks": 100}, "it ran more than 100 processes and threads (the limit on tasks)"),
    ("import time\n"  # empty files hold no block, but each takes an inode: none is free
     "for i in range(3000):\n"
     "    open(f'w/{i}', 'w').close()\n"
     "time.sleep(600)", {"written": 8 << 20}, "it wrote more than 8 MiB into its run directory and /tmp "
                                              "(the limit on bytes written)"),
])
def test_a_run_past_a_limit_is_stopped_and_the_report_says_which(tmp_path, monkeypatch, code, limits, expected):
    monkeypatch.chdir(tmp_path)
    exit_code, why, output = supervised(tmp_path, code, **limits)
    assert (exit_code, why) == (supervise.EXIT_LIMIT, expected)
    assert f"autoresearch: the run was stopped: {expected}".encode() in output


def cgroup_available():
    """Whether the supervisor can make a pids cgroup here (root, a writable cgroup file system)."""
    made = supervise.make_cgroup(100)
    supervise.remove_cgroup(made)
    return bool(made)


@pytest.mark.skipif(not cgroup_available(), reason="no pids cgroup can be made here (not root, or read-only)")
def test_a_fork_bomb_meets_the_tasks_ceiling_and_ends(tmp_path):
    """Exponential: every process forks for ever. The cgroup's pids.max holds it; all of it ends."""
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    before = len(os.listdir("/proc"))
    exit_code, why, _ = supervised(tmp_path, bomb, processes=10**6, tasks=200)
    assert (exit_code, why) == (supervise.EXIT_LIMIT, "it ran more than 200 processes and threads "
                                                      "(the limit on tasks)")
    time.sleep(0.5)
    assert len(os.listdir("/proc")) < before + 50  # (nothing of it left)


def test_the_run_limits_flag():
    limits = training.parse_limits("written=64G,file=512M,output=2G,processes=2048")
    assert (limits.written, limits.file, limits.output, limits.processes) == (64 << 30, 512 << 20, 2 << 30, 2048)
    assert limits.tasks >= 16 * 2048
    for bad in ("written", "written=lots", "disk=1G", "processes=-1"):
        with pytest.raises(SystemExit, match="--run-limits"):
            training.parse_limits(bad)


@pytest.mark.parametrize("mode, limits, reason", [
    ("write_big", "written=2M", "it wrote more than 2 MiB into its run directory and /tmp"),
    ("flood", "output=4M", "it printed more than 4 MiB"),
    ("spawn", "processes=20", "it ran more than 20 processes at once"),
])
def test_a_run_past_a_limit_is_a_crash_row_that_says_which(repo, fake, mode, limits, reason):
    fake.replies += [edit("greedy", (MODE_LINE, f'MODE = "{mode}"'))]
    assert run("--max-experiments", "1", "--fix-attempts", "0", "--greedy", "--run-limits", limits) == 0
    r = rows(repo)
    assert r[1]["status"] == "crash" and f"stopped at a limit: {reason}" in r[1]["description"]
    assert not (repo / "runs/t/0001/train-files").exists()  # what it wrote is removed
    assert (repo / "runs/t/0001/train.log").exists()  # its log kept
    assert not (repo / "runs/t/0001/train-tmp").exists()
    assert r[0]["status"] == "keep"  # the baseline, under the same limits, never near them


def test_a_daemon_started_by_train_py_ends_with_its_run_without_the_sandbox(repo, fake, tmp_path, monkeypatch):
    monkeypatch.setenv("STANDIN_GRANDCHILD_FILE", str(tmp_path / "grandchild.pid"))
    fake.replies += [edit("daemon", (MODE_LINE, 'MODE = "setsid_grandchild"'))]
    assert run("--max-experiments", "1", "--greedy") == 0
    assert pid_gone(int((tmp_path / "grandchild.pid").read_text()))
    assert rows(repo)[1]["status"] in ("keep", "discard")  # an ordinary run otherwise


def test_a_long_line_and_a_secret_in_a_failed_run_reach_the_model_cut_and_masked(repo, fake, monkeypatch):
    monkeypatch.setenv("STANDIN_SECRET_TEXT", "-----BEGIN OPENSSH PRIVATE KEY-----\\nb3BlbnNzaC1rZXkt\\n"
                                              "-----END OPENSSH PRIVATE KEY----- and sk-ant-test-secret")
    fake.replies += [edit("long line", (MODE_LINE, 'MODE = "long_line_crash"')),
                     edit("fixed?", ('MODE = "long_line_crash"', 'MODE = "nometric"'))]
    assert run("--max-experiments", "1", "--fix-attempts", "1", "--greedy") == 0
    fix_request = json.dumps(next(r["messages"][-1] for r in fake.requests if "The run failed" in json.dumps(r)))
    assert "stand-in crash after a long line" in fix_request and "more characters cut" in fix_request
    assert len(fix_request) < 3 * prompt.LOG_TAIL_CHARS
    assert "sk-ant-test-secret" not in fix_request and "b3BlbnNzaC1rZXkt" not in fix_request
    assert "[masked]" in fix_request


def test_a_log_tail_reads_only_the_end_of_the_log(tmp_path):
    log = tmp_path / "train.log"
    with open(log, "wb") as f:
        f.write(b"z" * (64 << 20))  # one line of 64 MiB
        f.write(b"\nTraceback: the end\n")
    tail = prompt.log_tail(log)
    assert tail.endswith("Traceback: the end") and len(tail) < prompt.LOG_TAIL_CHARS + 200
    assert "more characters cut" in tail


def test_a_folder_nested_thousands_deep_is_counted_and_removed(tmp_path, monkeypatch):
    """Past Python's recursion limit: the supervisor still counts it, the driver still removes it."""
    monkeypatch.chdir(tmp_path)
    deep = ("import os, time\n"  # (one level at a time: a path of 3,000 levels is past PATH_MAX, which
            "os.chdir('w')\n"     # failed the run with ENAMETOOLONG when the supervisor looked late)
            "for _ in range(3000):\n"
            "    os.mkdir('d')\n"
            "    os.chdir('d')\n"
            "time.sleep(600)")
    try:
        code, why, _ = supervised(tmp_path, deep, written=4 << 20)
        assert (code, why) == (supervise.EXIT_LIMIT, "it wrote more than 4 MiB into its run directory and /tmp "
                                                     "(the limit on bytes written)")
    finally:  # (also when it fails: a later pytest's clean-up of old temporary folders recurses too deep)
        scoring.remove(tmp_path / "w")
    assert not (tmp_path / "w").exists()
