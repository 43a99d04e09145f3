"""The driver (issue 8): failing fast before any GPU time, and the faults an independent
fault-injection run found in the single-file driver: stale git locks, kills during start-up,
the noise floor after a resume, broken API replies, a train.py that touches the driver's
records, a damaged journal, SIGTERM/SIGHUP, and what reaches train.py's environment.
Run: python -m pytest tests/test_driver_faults.py"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from driver_helpers import (BASE_LINE, MODE_LINE, DRIVER_ARGS, branch_log, fake, git, journal, noisy,  # noqa: F401
                            exit_code, pid_gone, repo, rows, run, stop_signals_handled)
from fake_anthropic import cut_short, edit, error, html_page, not_a_message
from autoresearch import cli, decisions, experiment, llm, records


class Killed(BaseException):
    """Stands for kill -9 at one exact instant."""


# ---------------------------------------------------------------------------
# Fail fast, before any GPU time
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("status,kind,says", [(401, "authentication_error", "check ANTHROPIC_API_KEY"),
                                              (403, "permission_error", "not allowed"),
                                              (404, "not_found_error", "unknown model 'claude-nope'")])
def test_key_and_model_are_checked_before_the_baseline(repo, fake, status, kind, says):
    fake.model_replies += [error(status, kind, "nope")]
    fake.replies += [error(status, kind, "nope")]  # a 404 is confirmed with one tiny message
    with pytest.raises(SystemExit) as stop:
        run("--model", "claude-nope")
    assert says in str(stop.value) and str(stop.value).count("\n") == 0
    assert fake.model_checks == ["claude-nope"] and len(fake.requests) == (status == 404)
    assert not (repo / "results.tsv").exists() and not (repo / "runs/t").exists()  # no run, no GPU time
    assert git(repo, "branch", "--list", "autoresearch/*") == ""


def test_the_access_check_retries_transient_errors(repo, fake, capsys):
    fake.model_replies += [error(529, "overloaded_error", "Overloaded"), html_page(), cut_short()]
    assert run("--max-experiments", "0", "--greedy") == 0
    assert len(fake.model_checks) == 4 and [x["description"] for x in rows(repo)] == ["baseline"]
    assert sum("LLM API:" in line for line in capsys.readouterr().out.splitlines()) == 3


def test_without_cuda_the_default_settings_are_refused(repo, fake):
    with pytest.raises(SystemExit) as stop:
        cli.main(["--tag", "t"])  # no --allow-cpu, and this machine has no CUDA
    assert "no CUDA GPU found" in str(stop.value) and "--allow-cpu" in str(stop.value)
    assert fake.model_checks == [] and not (repo / "runs/t").exists()


def test_default_timeout_leaves_room_beyond_the_budget(repo, fake, capsys):
    assert run("--max-experiments", "0", "--greedy") == 0  # TIME_BUDGET is 5 in these tests
    assert "timeout 310 s" in capsys.readouterr().out
    assert "2 x TIME_BUDGET + 300 s" in " ".join(cli.parser().format_help().split())


# ---------------------------------------------------------------------------
# 1, 2. A stale git lock; a kill at any start-up step
# ---------------------------------------------------------------------------

def test_a_stale_index_lock_from_a_killed_git_is_removed(repo, fake, capsys):
    fake.replies += [edit("lower", (BASE_LINE, "TRUE_BPB = 0.990000"))]
    assert run("--max-experiments", "0", "--greedy") == 0
    (repo / ".git" / "index.lock").write_text("")  # what `kill -9` leaves while git writes the index
    assert run("--max-experiments", "1", "--greedy") == 0
    assert "index.lock, left by a git process that was killed" in capsys.readouterr().out
    assert [x["description"] for x in rows(repo)] == ["baseline", "lower"]
    assert not (repo / ".git" / "index.lock").exists()


def test_a_lock_a_live_git_holds_is_waited_for(repo, monkeypatch, capsys):
    lock = repo / ".git" / "index.lock"
    lock.write_text("")
    waits = []
    monkeypatch.setattr(records, "git_running_in", lambda repo: lock.exists())  # a live git holds it...

    def live_git_finishes(seconds):  # ...and is done a second later
        waits.append(seconds)
        lock.unlink()
    monkeypatch.setattr(records.time, "sleep", live_git_finishes)
    (repo / "program.md").write_text("changed\n")
    records.git(repo, "add", "program.md")
    assert "program.md" in git(repo, "diff", "--cached", "--name-only")
    assert waits == [1.0] and "removing" not in capsys.readouterr().out  # waited for, not removed


def git_dies(patch, when, match):
    """cli's git dies (kill -9) before or after the first command whose arguments hold `match`."""
    original = cli.git

    def git(repo, *args, **kwargs):
        if match in args and when == "before":
            raise Killed
        result = original(repo, *args, **kwargs)
        if match in args:
            raise Killed
        return result
    patch.setattr(cli, "git", git)


def dies(*args):
    raise Killed


@pytest.mark.parametrize("where", ["check_access", "first journal write", "before the branch", "after the branch"])
def test_killed_during_start_up_then_restarted(repo, fake, monkeypatch, where):
    with monkeypatch.context() as patch:
        if where == "check_access":
            patch.setattr(llm.AnthropicProvider, "check_access", dies)
        elif where == "first journal write":
            patch.setattr(records, "save_night", dies)
        else:
            git_dies(patch, where.split()[0], "-b")
        with pytest.raises(Killed):
            run("--max-experiments", "0", "--greedy")
    assert run("--max-experiments", "0", "--greedy") == 0
    assert [x["description"] for x in rows(repo)] == ["baseline"]
    assert git(repo, "symbolic-ref", "HEAD") == "refs/heads/autoresearch/t" and branch_log(repo) == ["initial"]


# ---------------------------------------------------------------------------
# 3. The same decisions with the same figures after a resume
# ---------------------------------------------------------------------------

def sigma_from_rows(repo):
    """The noise floor recomputed from results.tsv: every code (commit) run more than once."""
    groups = {}
    for r in rows(repo):
        if r["status"] != "crash":
            groups.setdefault(r["commit"], []).append(float(r["val_bpb"]))
    return decisions.pooled_std(list(groups.values()))


@pytest.mark.parametrize("killed", [False, True], ids=["uninterrupted", "killed after the repeat of the best"])
def test_noise_floor_after_a_resume_is_the_uninterrupted_one(noisy, fake, monkeypatch, killed):
    """A repeat of the best belongs to the best's group, on disk as in memory: a resumed run
    computes the same sigma (and margins) as one that was never stopped."""
    ideas = [edit("clear gain", (BASE_LINE, "TRUE_BPB = 0.995000")),
             edit("small gain on top", ("TRUE_BPB = 0.995000", "TRUE_BPB = 0.994000"), ("DATA_ORDER = 0", "DATA_ORDER = 3"))]
    fake.replies += ideas
    if killed:
        original = experiment.save

        def dies_after_repeat_of_best(ctx, night):
            original(ctx, night)
            if any(p.runs and p.runs[-1].role == "best" for p in night.in_flight):
                raise Killed
        monkeypatch.setattr(experiment, "save", dies_after_repeat_of_best)
        with pytest.raises(Killed):
            run("--max-experiments", "2")
        monkeypatch.setattr(experiment, "save", original)
    assert run("--max-experiments", "2") == 0
    r = rows(noisy)
    assert [x["description"].split(":")[0] for x in r[4:]] == [
        "small gain on top [confirmed", "repeat 2/3 (seed 45)", "repeat of best (seed 46)", "repeat 3/3 (seed 47)"]
    assert journal(noisy)["sigma"] == pytest.approx(sigma_from_rows(noisy), abs=1e-12)
    assert [len(v) for v in journal(noisy)["groups"].values()] == [3, 2, 3]


def test_a_journal_of_the_single_file_driver_resumes(noisy, fake):
    """Written by the driver before the package: rows counted, the best's values beside its group."""
    assert run("--max-experiments", "0") == 0
    st = journal(noisy)
    best = st["best"]["commit"]
    old = {**st, "rows": len(st["rows"]), "best": {**st["best"], "vals": st["groups"][best]},
           "groups": {best: list(st["groups"][best])}}
    (noisy / "runs/t/journal.json").write_text(json.dumps(old))
    fake.replies += [edit("clear gain", (BASE_LINE, "TRUE_BPB = 0.995000"))]
    assert run("--max-experiments", "1") == 0
    assert [x["description"] for x in rows(noisy)][3:] == ["clear gain"] and branch_log(noisy)[0] == "clear gain"
    assert journal(noisy)["sigma"] == pytest.approx(st["sigma"])


# ---------------------------------------------------------------------------
# 4. Broken 200 replies are transient
# ---------------------------------------------------------------------------

def test_a_reply_cut_short_an_html_page_or_another_json_is_retried(repo, fake, capsys):
    good = edit("good", (BASE_LINE, "TRUE_BPB = 0.990000"))
    fake.replies += [cut_short(), html_page(), not_a_message(), good]
    assert run("--max-experiments", "1", "--greedy") == 0
    assert [x["status"] for x in rows(repo)] == ["keep", "keep"] and len(fake.requests) == 4
    retries = [line for line in capsys.readouterr().out.splitlines() if "LLM API:" in line]
    assert len(retries) == 3 and "not the API's" in retries[1] and "not the API's" in retries[2]


def test_a_gateway_without_the_models_list_is_checked_with_one_tiny_message(repo, fake):
    fake.model_replies += [error(404, "not_found_error", "no such route")]
    fake.replies += [edit("pong")]  # any message will do
    assert run("--max-experiments", "0", "--greedy") == 0
    assert fake.requests[0]["max_tokens"] == 1 and [x["description"] for x in rows(repo)] == ["baseline"]


# ---------------------------------------------------------------------------
# 5.-7. A train.py that touches the records, or reports an impossible number
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["write_tsv", "write_tsv_no_newline", "delete_tsv"])
def test_a_train_py_that_writes_to_results_tsv_is_refused_and_the_rows_repaired(repo, fake, mode):
    fake.replies += [edit("sneaky", (MODE_LINE, f'MODE = "{mode}"'), (BASE_LINE, "TRUE_BPB = 0.500000")),
                     edit("honest", (BASE_LINE, "TRUE_BPB = 0.990000"))]
    assert run("--max-experiments", "2", "--fix-attempts", "0", "--greedy") == 0
    r = rows(repo)
    assert [(x["description"].split(" [")[0], x["status"]) for x in r] == [
        ("baseline", "keep"), ("sneaky", "crash"), ("honest", "keep")]  # its own rows are all there
    assert "refused: train.py wrote to results.tsv" in r[1]["description"]
    assert "a row train.py wrote" not in (repo / "results.tsv").read_text()
    aside = list((repo / "runs/t").glob("results-foreign-*.tsv"))
    if mode != "delete_tsv":
        assert len(aside) == 1 and "a row train.py wrote" in aside[0].read_text()  # set aside, not deleted


def commit_on(repo, branch, changes):
    """A commit on `branch` that changes files, made without checking it out (the user's own work)."""
    env = {**os.environ, "GIT_INDEX_FILE": str(repo / ".git" / "other-index")}

    def plumbing(*args, **kwargs):
        return subprocess.run(["git", *args], cwd=repo, env=env, capture_output=True, text=True, check=True,
                              **kwargs).stdout.strip()
    plumbing("read-tree", branch)
    for name, text in changes.items():
        blob = plumbing("hash-object", "-w", "--stdin", input=text)
        plumbing("update-index", "--add", "--cacheinfo", f"100644,{blob},{name}")
    commit = plumbing("commit-tree", plumbing("write-tree"), "-p", branch, "-m", "the user's work")
    plumbing("update-ref", f"refs/heads/{branch}", commit)
    return commit


def test_a_train_py_that_checks_out_another_branch_moves_no_branch(repo, fake):
    """master differs in program.md and prepare.py too: after the refused run the work tree is the
    driver's again (its program.md, its prepare.py: the metric did not change), master unmoved."""
    assert run("--max-experiments", "0", "--greedy") == 0
    program, prepare = (repo / "program.md").read_text(), (repo / "prepare.py").read_text()
    master = commit_on(repo, "master", {"program.md": "the user's program on master\n",
                                        "prepare.py": prepare + "# another metric\n"})
    fake.replies += [edit("checkout", (MODE_LINE, 'MODE = "git_checkout"'), (BASE_LINE, "TRUE_BPB = 0.500000")),
                     edit("honest", (BASE_LINE, "TRUE_BPB = 0.990000"))]
    assert run("--max-experiments", "2", "--fix-attempts", "0", "--greedy") == 0
    r = rows(repo)
    assert r[1]["status"] == "crash" and "refused: train.py moved git's HEAD to master" in r[1]["description"]
    assert git(repo, "rev-parse", "master") == master  # the user's branch did not move
    assert git(repo, "symbolic-ref", "HEAD") == "refs/heads/autoresearch/t"
    assert branch_log(repo) == ["honest", "initial"] and r[2]["status"] == "keep"
    assert (repo / "program.md").read_text() == program and (repo / "prepare.py").read_text() == prepare
    assert git(repo, "status", "--porcelain", "--untracked-files=no") == ""


def test_a_train_py_that_moves_its_own_worktree_is_refused(repo, fake):
    fake.replies += [edit("branches", (MODE_LINE, 'MODE = "git_checkout_worktree"'), (BASE_LINE, "TRUE_BPB = 0.5")),
                     edit("honest", (BASE_LINE, "TRUE_BPB = 0.990000"))]
    assert run("--max-experiments", "2", "--fix-attempts", "0", "--greedy") == 0
    r = rows(repo)
    assert r[1]["status"] == "crash" and "refused: train.py moved git's HEAD in its worktree" in r[1]["description"]
    assert r[2]["status"] == "keep" and branch_log(repo) == ["honest", "initial"]


# ---------------------------------------------------------------------------
# 9. A damaged journal
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["empty", "cut in half"])
def test_a_damaged_journal_is_rebuilt_from_results_tsv_and_git(noisy, fake, capsys, damage):
    fake.replies += [edit("clear gain", (BASE_LINE, "TRUE_BPB = 0.995000")),
                     edit("worse", ("TRUE_BPB = 0.995000", "TRUE_BPB = 1.010000")),
                     edit("another gain", ("TRUE_BPB = 0.995000", "TRUE_BPB = 0.990000"))]
    assert run("--max-experiments", "2") == 0
    before = journal(noisy)
    path = noisy / "runs/t/journal.json"
    path.write_text("" if damage == "empty" else path.read_text()[:len(path.read_text()) // 2])
    capsys.readouterr()
    assert run("--max-experiments", "3") == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if "was damaged" in line)
    assert "rebuilt the run from results.tsv and autoresearch/t: 5 rows" in line
    assert list((noisy / "runs/t").glob("journal-damaged-*.json"))
    after = journal(noisy)
    assert after["best"]["commit"] != before["best"]["commit"] and branch_log(noisy)[:2] == ["another gain", "clear gain"]
    assert after["sigma"] == pytest.approx(sigma_from_rows(noisy))
    assert [x["description"].split(" [")[0] for x in rows(noisy)][3:] == ["clear gain", "worse", "another gain"]


def test_a_damaged_journal_with_nothing_to_rebuild_from_names_the_command(repo, fake):
    assert run("--max-experiments", "0", "--greedy") == 0
    (repo / "runs/t/journal.json").write_text("{\"tag\": ")
    (repo / "results.tsv").unlink()
    with pytest.raises(SystemExit) as stop:
        run("--greedy")
    assert "is damaged" in str(stop.value) and "`python driver.py --tag t-2`" in str(stop.value)


# ---------------------------------------------------------------------------
# 10. SIGTERM and SIGHUP end the run like Ctrl-C
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_sigterm_and_sighup_end_the_training_group_and_resume(repo, fake, tmp_path, monkeypatch, signum):
    once, pid_file = tmp_path / "once", tmp_path / "training.pid"
    monkeypatch.setenv("STANDIN_ONCE_FILE", str(once))
    monkeypatch.setenv("STANDIN_PID_FILE", str(pid_file))
    fake.replies += [edit("slow but good", (MODE_LINE, 'MODE = "slow_once"'), (BASE_LINE, "TRUE_BPB = 0.990000"))]
    out = open(tmp_path / "driver.out", "ab")
    command = [sys.executable, "driver.py", "--tag", "t", *DRIVER_ARGS, "--max-experiments", "1",
               "--greedy"]
    # The suite itself may run with these signals ignored (under nohup, as a background job: how the
    # SIGHUP case failed now and then in CI, its driver inheriting the ignore and never stopping);
    # the driver under test is started as from a terminal all the same.
    ignored = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        with stop_signals_handled():
            proc = subprocess.Popen(command, cwd=repo, stdout=out, stderr=subprocess.STDOUT)
    finally:
        for s, handler in ignored.items():
            signal.signal(s, handler)
    for _ in range(600):
        if once.exists() and pid_file.exists() and pid_file.read_text():
            break
        assert proc.poll() is None, (tmp_path / "driver.out").read_text()
        time.sleep(0.05)
    training_pid = int(pid_file.read_text())
    proc.send_signal(signum)
    assert exit_code(proc, tmp_path / "driver.out") == 130
    assert pid_gone(training_pid), "the training run outlived the driver"
    assert "interrupted; `python driver.py --tag t` resumes this run" in (tmp_path / "driver.out").read_text()
    assert git(repo, "status", "--porcelain", "--untracked-files=no") == ""
    assert subprocess.run(command, cwd=repo, stdout=out, stderr=subprocess.STDOUT, timeout=60).returncode == 0
    assert [x["description"] for x in rows(repo)] == ["baseline", "slow but good"]


# ---------------------------------------------------------------------------
# 11. train.py's environment: an allow-list
# ---------------------------------------------------------------------------

def test_training_environment_is_an_allow_list(repo, fake, monkeypatch):
    secrets = {"AWS_ACCESS_KEY_ID": "AKIA0000", "DATABASE_URL": "postgres://u:pw@db/x", "FOO_KEY": "foo-key-value",
               "SLACK_WEBHOOK_URL": "https://hooks.slack.com/services/T/B/x", "HTTPS_PROXY": "http://proxy:3128",
               "GITHUB_TOKEN": "ghp_x", "OPENAI_API_KEY": "sk-x", "HF_TOKEN": "hf_x", "MY_SERVICE_TOKEN": "svc-x",
               "ANTHROPIC_AUTH_TOKEN": "ant-x", "ANTHROPIC_API_KEY": "sk-ant-test-secret"}
    for name, value in {**secrets, "CUDA_VISIBLE_DEVICES": "0", "TORCHINDUCTOR_CACHE_DIR": "/tmp/x",
                        "OMP_NUM_THREADS": "2", "LC_ALL": "C.UTF-8", "MY_SETTING": "on"}.items():
        monkeypatch.setenv(name, value)
    assert run("--max-experiments", "0", "--greedy", "--pass-env", "MY_SETTING") == 0
    log = (repo / "runs/t/0000/train.log").read_text()
    env = json.loads(log.split("env: ")[1].split("\n")[0])
    assert not set(secrets) & set(env) and not [v for v in secrets.values() if v in log]
    assert {"PATH", "HOME", "CUDA_VISIBLE_DEVICES", "TORCHINDUCTOR_CACHE_DIR", "OMP_NUM_THREADS", "LC_ALL",
            "AUTORESEARCH_SEED", "AUTORESEARCH_CACHE", "MY_SETTING"} <= set(env)


def test_under_nohup_sighup_stays_ignored(repo, fake, tmp_path, monkeypatch):
    """`nohup python driver.py &` then logging out: the night goes on."""
    once, pid_file = tmp_path / "once", tmp_path / "training.pid"
    monkeypatch.setenv("STANDIN_ONCE_FILE", str(once))
    monkeypatch.setenv("STANDIN_PID_FILE", str(pid_file))
    fake.replies += [edit("slow", (MODE_LINE, 'MODE = "slow_once"'), (BASE_LINE, "TRUE_BPB = 0.990000"))]
    once.write_text("x")  # the stand-in does not sleep: the run just has to finish
    proc = subprocess.Popen([sys.executable, "driver.py", "--tag", "t", *DRIVER_ARGS,
                             "--max-experiments", "1", "--greedy"], cwd=repo, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    for _ in range(600):
        if pid_file.exists() and pid_file.read_text():
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGHUP)
    out = proc.communicate(timeout=60)[0].decode()
    assert proc.returncode == 0, out
    assert [x["description"] for x in rows(repo)] == ["baseline", "slow"]


def test_a_kill_before_a_fix_is_recorded_re_asks_from_the_attempts_own_conversation(repo, fake, monkeypatch):
    fake.replies += [edit("crashes", (MODE_LINE, 'MODE = "crash"'), (BASE_LINE, "TRUE_BPB = 0.980000")),
                     edit("the fix", ('MODE = "crash"', MODE_LINE)),
                     edit("the fix", ('MODE = "crash"', MODE_LINE))]
    assert run("--max-experiments", "0", "--greedy") == 0
    original = experiment.save

    def dies_when_the_fix_is_recorded(ctx, night):
        if any(p.attempt == 1 for p in night.in_flight):
            raise Killed
        original(ctx, night)
    with monkeypatch.context() as patch:
        patch.setattr(experiment, "save", dies_when_the_fix_is_recorded)
        with pytest.raises(Killed):
            run("--max-experiments", "1", "--greedy")
    assert run("--max-experiments", "1", "--greedy") == 0
    first_fix, second_fix = fake.requests[1], fake.requests[2]
    assert first_fix["messages"] == second_fix["messages"]  # the same question again, not "your fix failed"
    assert [x["status"] for x in rows(repo)] == ["keep", "crash", "keep"]


def test_refused_identical_values_do_not_narrow_the_noise_floor(noisy, fake):
    fake.replies += [edit("ignores the seed", ("NOISE_STD = 0.001", "NOISE_STD = 0.0"), (BASE_LINE, "TRUE_BPB = 0.998500"))]
    assert run("--max-experiments", "0") == 0
    sigma = journal(noisy)["sigma"]
    assert run("--max-experiments", "1") == 0
    r = rows(noisy)[3:]
    assert len(r) == 3 and "refused: identical val_bpb on different seeds" in r[0]["description"]
    assert journal(noisy)["sigma"] == sigma and len(journal(noisy)["groups"]) == 1


def test_a_rebuilt_journal_keeps_the_settings_and_metric_the_run_started_with(repo, fake, monkeypatch):
    assert run("--max-experiments", "0", "--greedy") == 0
    (repo / "runs/t/journal.json").write_text("")
    monkeypatch.setenv("AUTORESEARCH_TIME_BUDGET", "6")
    with pytest.raises(SystemExit, match="run t started with .*'time_budget': 5"):
        run("--greedy")


def test_the_variables_train_py_does_not_get_are_named_once(repo, fake, monkeypatch, capsys):
    monkeypatch.setenv("CUSTOM_DATA_ROOT", "/data")
    assert run("--max-experiments", "0", "--greedy") == 0
    note = next(line for line in capsys.readouterr().out.splitlines() if "does not get" in line)
    assert "CUSTOM_DATA_ROOT" in note and "--pass-env NAME" in note and "ANTHROPIC_API_KEY" in note
