"""The driver (issue 4, package autoresearch/ since issue 8): the loop against a fake Anthropic
server, a real git repository in tmp_path and stand-in training scripts.
Run: python -m pytest tests/test_driver.py"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from driver_helpers import (BASE_LINE, MODE_LINE, DRIVER_ARGS, STANDINS, branch_log, check_real_runs, exit_code,
                            stop_signals_handled,  # noqa: F401
                            fake, git, pid_gone, repo, rows, run, use_real_train_py)
from autoresearch import cli, experiment, llm, records, slots, training
from autoresearch.report import report
from fake_anthropic import drop, edit, error, slow


def test_baseline_keep_and_revert(repo, fake):
    fake.replies += [edit("lower bpb", (BASE_LINE, "TRUE_BPB = 0.990000")),
                     edit("worse idea", ("TRUE_BPB = 0.990000", "TRUE_BPB = 0.995000"))]
    assert run("--max-experiments", "2", "--greedy") == 0
    r = rows(repo)
    assert [x["status"] for x in r] == ["keep", "keep", "discard"]
    assert r[0]["description"] == "baseline" and r[0]["val_bpb"] == "1.000000"
    assert r[1]["val_bpb"] == "0.990000" and r[1]["memory_gb"] == "2.0"
    assert branch_log(repo) == ["lower bpb", "initial"]  # only kept experiments on the branch
    assert "TRUE_BPB = 0.990000" in (repo / "train.py").read_text()  # restored from the best
    assert git(repo, "status", "--porcelain", "--untracked-files=no") == ""
    # the discarded attempt stays readable under a ref
    diff = git(repo, "diff", "autoresearch/t", "refs/autoresearch/t/discarded/0002", "--", "train.py")
    assert "+TRUE_BPB = 0.995000" in diff
    # results.tsv and the per-experiment files are not tracked
    assert "results.tsv" not in git(repo, "ls-files")
    for name in ("prompt.json", "reply.json", "diff.patch", "train.log", "usage.json"):
        assert (repo / "runs/t/0002" / name).exists(), name
    assert "TRUE_BPB = 0.995000" in (repo / "runs/t/0002/diff.patch").read_text()
    # what the LLM saw: program.md, prepare.py's constants and metric, train.py, the history
    req = fake.requests[1]
    system = "\n".join(b["text"] for b in req["system"])
    assert "Lower val_bpb. One idea per experiment." in system
    assert "TIME_BUDGET = " in system and "def evaluate_bpb" in system and "def metric_files" not in system
    assert "Values in force for this run: MAX_SEQ_LEN = 2048, TIME_BUDGET = 5, EVAL_TOKENS = 20971520." in system
    user = "\n".join(b["text"] for b in req["messages"][0]["content"])
    assert "TRUE_BPB = 0.990000" in user  # the current (best) train.py
    assert "lower bpb   <- best so far" in user and "baseline" in user
    assert any("cache_control" in b for b in req["system"])
    assert "tool_choice" not in req  # forcing the tool is a 400 on models that think
    usage = json.loads((repo / "runs/t/0002/usage.json").read_text())
    # the default, sonnet 5.5: 1000 in x $2 + 200 out x $10 + 2000 cache-write x $2.50 + 3000 cache-read x $0.10
    assert usage["usd"] == pytest.approx((1000 * 2 + 200 * 10 + 2000 * 2.5 + 3000 * 0.1) / 1e6)


def test_crash_fix_then_success_and_repeated_crash(repo, fake):
    fake.replies += [
        edit("bigger batch", (MODE_LINE, 'MODE = "crash"'), (BASE_LINE, "TRUE_BPB = 0.980000")),
        edit("smaller batch fits", ('MODE = "crash"', MODE_LINE)),
        edit("deeper model", (MODE_LINE, 'MODE = "crash"'), ("TRUE_BPB = 0.980000", "TRUE_BPB = 0.970000")),
        edit("deeper model, fixed?", ('MODE = "crash"', 'MODE = "nan"')),
    ]
    assert run("--max-experiments", "2", "--fix-attempts", "1", "--greedy") == 0
    r = rows(repo)
    assert [x["status"] for x in r] == ["keep", "crash", "keep", "crash", "crash"]
    assert r[1]["val_bpb"] == "0.000000" and r[1]["memory_gb"] == "0.0"
    assert "stand-in crash" not in r[1]["description"] and "no val_bpb" in r[1]["description"]
    assert r[2]["val_bpb"] == "0.980000" and "smaller batch fits" in r[2]["description"]
    # the fix request carried the log tail as an error tool_result
    assistant = fake.requests[1]["messages"][-2]  # the edit's turn, its thinking block verbatim
    assert assistant["content"][0] == {"type": "thinking", "thinking": "thought 1", "signature": "sig_1"}
    fix_request = fake.requests[1]["messages"][-1]["content"][0]
    assert fix_request["type"] == "tool_result" and fix_request["is_error"]
    assert "RuntimeError: stand-in crash: CUDA out of memory" in fix_request["content"]
    assert branch_log(repo)[0].startswith("bigger batch (fix: smaller batch fits)")
    assert len(branch_log(repo)) == 2  # one commit per kept experiment
    refs = git(repo, "for-each-ref", "--format=%(refname)", "refs/autoresearch/t").split()
    assert refs == ["refs/autoresearch/t/discarded/0001-1", "refs/autoresearch/t/discarded/0002",
                    "refs/autoresearch/t/discarded/0002-1"]


def test_hang_kills_the_whole_group_at_the_timeout(repo, fake, tmp_path, monkeypatch):
    grandchild_file = tmp_path / "grandchild.pid"
    monkeypatch.setenv("STANDIN_GRANDCHILD_FILE", str(grandchild_file))
    fake.replies += [edit("hangs", (MODE_LINE, 'MODE = "hang"'))]
    assert run("--max-experiments", "1", "--fix-attempts", "0", "--timeout", "2", "--greedy") == 0
    r = rows(repo)
    assert r[1]["status"] == "crash" and "timed out after 2 s" in r[1]["description"]
    pid = int(grandchild_file.read_text())
    for _ in range(50):  # SIGKILL was sent; give the kernel a moment to reap it
        if pid_gone(pid):
            break
        time.sleep(0.1)
    assert pid_gone(pid), "the grandchild (which ignores SIGTERM) survived"


def test_invalid_edits_are_reasked_without_any_training(repo, fake, capsys):
    fake.replies += [
        edit("typo", ("TRUE_BPB = 1.00000\n", "x")),                   # not found
        edit("ambiguous", ("print(", "print (")),                      # many matches
        edit("broken", (MODE_LINE, "MODE = (")),                        # does not compile
        edit("nothing", (MODE_LINE, MODE_LINE)),                        # no-op
        edit("seed only", ('"AUTORESEARCH_SEED", "42"', '"AUTORESEARCH_SEED", "7"')),
        edit("good", (BASE_LINE, "TRUE_BPB = 0.990000")),
        edit("back to the start", ("TRUE_BPB = 0.990000", BASE_LINE)),  # identical to the baseline
        edit("good again", ("TRUE_BPB = 0.990000", "TRUE_BPB = 0.985000")),
    ]
    assert run("--max-experiments", "3", "--greedy") == 0
    assert [x["description"] for x in rows(repo)] == ["baseline", "good", "good again"]
    assert sorted(p.name for p in (repo / "runs/t").glob("*/train.log")) == ["train.log"] * 3
    assert not (repo / "runs/t/0001/train.log").exists()
    errors = [l.split("edit rejected: ")[1] for l in capsys.readouterr().out.splitlines() if "edit rejected" in l]
    sent = [m["content"][0]["content"] for req in fake.requests for m in req["messages"][-1:]
            if isinstance(m["content"], list) and m["content"][0].get("is_error")]
    assert sent == errors[:2] + errors[3:5] + errors[5:]  # the 3rd attempt's error ends experiment 1
    assert "edit 1: the search text was not found" in errors[0]
    assert "closest line in train.py is: 'TRUE_BPB = 1.000000'" in errors[0]
    assert f"matches {(STANDINS / 'train.py').read_text().count('print(')} places" in errors[1]
    assert "does not compile: line" in errors[2]
    assert "unchanged" in errors[3]
    assert "only changes the seed" in errors[4]
    assert "identical to one already tried" in errors[5]


def test_transient_api_errors_are_retried(repo, fake, monkeypatch, capsys):
    good = edit("good", (BASE_LINE, "TRUE_BPB = 0.990000"))
    fake.replies += [error(429, "rate_limit_error"), error(529, "overloaded_error", "Overloaded"),
                     error(500), error(503), drop(), slow(1.5, good), good]
    assert run("--max-experiments", "1", "--greedy", "--llm-timeout", "0.5") == 0
    assert [x["status"] for x in rows(repo)] == ["keep", "keep"]
    assert len(fake.requests) == 7
    retries = [line for line in capsys.readouterr().out.splitlines() if "LLM API:" in line]
    assert len(retries) == 6 and "HTTP 529 (Overloaded)" in retries[1]
    assert "connection problem" in retries[4] and "APITimeoutError" in retries[5]


@pytest.mark.parametrize("status,kind,says", [(401, "authentication_error", "check ANTHROPIC_API_KEY"),
                                              (404, "not_found_error", "unknown model 'claude-nope'")])
def test_bad_key_or_unknown_model_stops_at_once(repo, fake, status, kind, says):
    fake.replies += [error(status, kind, "nope")]
    with pytest.raises(SystemExit) as stop:
        run("--max-experiments", "3", "--model", "claude-nope", "--greedy")
    assert says in str(stop.value)
    assert len(fake.requests) == 1
    assert [x["description"] for x in rows(repo)] == ["baseline"]
    assert git(repo, "status", "--porcelain", "--untracked-files=no") == ""


def test_program_md_edited_mid_run_survives_revert_and_reaches_next_request(repo, fake):
    def human_edits_program_md(request):
        (repo / "program.md").write_text("Focus on the optimizer tonight.\n")
        return edit("worse", (BASE_LINE, "TRUE_BPB = 1.100000"))
    fake.replies += [human_edits_program_md, edit("also worse", (BASE_LINE, "TRUE_BPB = 1.200000"))]
    assert run("--max-experiments", "2", "--greedy") == 0
    assert [x["status"] for x in rows(repo)] == ["keep", "discard", "discard"]
    assert (repo / "program.md").read_text() == "Focus on the optimizer tonight.\n"
    assert git(repo, "status", "--porcelain", "--untracked-files=no") == "M program.md"
    assert "Focus on the optimizer tonight." in json.dumps(fake.requests[1]["system"])
    assert "Focus on the optimizer" not in json.dumps(fake.requests[0]["system"])


@pytest.mark.parametrize("mode,says", [("nan", "no val_bpb: train.py exited with code 1 before its model was scored"),
                                       ("nometric", "no val_bpb: train.py ended without having its model scored"),
                                       ("fake_summary", "no val_bpb: train.py ended without having its model scored"),
                                       ("two_blocks", "refused: more than one summary block"),
                                       ("cheat", "refused: the model's outputs are not a pure function of each row's prefix"),
                                       ("exit_after", "refused: train.py exited with code 3 after its model was scored"),
                                       ("negative", "refused: val_bpb 0.000000 is impossible"),
                                       ("settings", "refused: the summary reports time_budget 10 but the driver runs with 5"),
                                       ("wrong_seed", "refused: the summary reports seed 43 but the driver set AUTORESEARCH_SEED=42")])
def test_failed_or_refused_runs_become_crash_rows(repo, fake, mode, says):
    fake.replies += [edit(mode, (MODE_LINE, f'MODE = "{mode}"'), (BASE_LINE, "TRUE_BPB = 0.500000"))]
    assert run("--max-experiments", "1", "--fix-attempts", "0", "--greedy") == 0
    r = rows(repo)
    assert r[1]["status"] == "crash" and r[1]["val_bpb"] == "0.000000" and says in r[1]["description"]
    assert branch_log(repo) == ["initial"]


def test_a_run_that_fails_after_it_was_scored_gets_no_fix(repo, fake):
    """It knew its score when it failed: a fix would give it another draw."""
    fake.replies += [edit("exits 3", (MODE_LINE, 'MODE = "exit_after"'), (BASE_LINE, "TRUE_BPB = 0.500000"))]
    assert run("--max-experiments", "1", "--fix-attempts", "2", "--greedy") == 0
    assert [x["status"] for x in rows(repo)] == ["keep", "crash"] and len(fake.requests) == 1


def test_what_a_run_printed_once_scored_is_kept_out_of_its_log(repo, fake):
    """The inputs it is scored on (validation text) never reach a log the model is shown."""
    fake.replies += [edit("echo", (MODE_LINE, 'MODE = "echo_inputs"'), (BASE_LINE, "TRUE_BPB = 0.900000"))]
    assert run("--max-experiments", "1", "--greedy") == 0
    log, scored = (repo / "runs/t/0001/train.log").read_text(), (repo / "runs/t/0001/train-scored.log").read_text()
    assert "scored on [[1, 1" in scored and "scored on" not in log
    assert "which no model is shown" in log and "val_bpb:          0.900000" in log and "trained from" in log


def test_folders_a_killed_driver_left_in_tmp_are_removed_at_start(repo, fake):
    """Weights and cache copies in /tmp/ar-<pid>-*: those of a process that is gone are removed."""
    stale, live = Path("/tmp/ar-999999999-left"), Path(f"/tmp/ar-{os.getpid()}-live")
    for d in (stale, live):
        d.mkdir(exist_ok=True)
        (d / "model.safetensors").write_bytes(b"weights")
    try:
        assert run("--max-experiments", "0", "--greedy") == 0
        assert not stale.exists() and live.exists()
    finally:
        shutil.rmtree(live, ignore_errors=True)


def test_a_bad_tag_stops_with_one_line(repo, fake):
    with pytest.raises(SystemExit, match="use letters, digits"):
        cli.main(["--tag", "my run/1"])
    assert fake.requests == [] and git(repo, "branch", "--list", "autoresearch/*") == ""


def test_missing_data_stops_before_any_llm_spend(repo, fake, tmp_path):
    (tmp_path / "cache" / "val.bin").unlink()
    with pytest.raises(SystemExit) as stop:
        run()
    assert str(stop.value).startswith("autoresearch: data is not prepared in ")  # one prefix, not two
    assert "python prepare.py" in str(stop.value)
    assert fake.requests == [] and not (repo / "results.tsv").exists()


def test_resume_continues_the_same_run(repo, fake, capsys):
    fake.replies += [edit("a", (BASE_LINE, "TRUE_BPB = 0.990000")), edit("b", ("TRUE_BPB = 0.990000", "TRUE_BPB = 0.980000"))]
    assert run("--max-experiments", "1", "--greedy") == 0
    assert run("--max-experiments", "2", "--greedy") == 0
    assert "resuming run t: 2 rows" in capsys.readouterr().out
    assert [x["description"] for x in rows(repo)] == ["baseline", "a", "b"]
    assert branch_log(repo) == ["b", "a", "initial"]


def test_parse_deadline():
    import datetime
    evening = datetime.datetime(2026, 11, 22, 21, 0)
    assert cli.parse_deadline("07:30", evening) == datetime.datetime(2026, 11, 23, 7, 30).timestamp()
    assert cli.parse_deadline("22:15", evening) == datetime.datetime(2026, 11, 22, 22, 15).timestamp()
    assert cli.parse_deadline("8h", evening) == evening.timestamp() + 8 * 3600
    assert cli.parse_deadline("90m", evening) == evening.timestamp() + 90 * 60
    with pytest.raises(SystemExit, match="give a time like 07:30"):
        cli.parse_deadline("tomorrow", evening)


@pytest.mark.parametrize("flag", [["--deadline", "tomorrow"], ["--run-limits", "disk=1G"], ["--gpus", "0,0"]])
def test_a_bad_flag_is_refused_before_anything_is_written(repo, fake, flag):
    """No journal, no branch: the next start is a fresh one, not a "resuming run"."""
    with pytest.raises(SystemExit, match=flag[0]):
        run(*flag)
    assert not (repo / "runs/t").exists() and not git(repo, "branch", "--list", "autoresearch/t")


def test_stop_conditions_deadline_and_spend(repo, fake, capsys):
    fake.replies += [edit("a", (BASE_LINE, "TRUE_BPB = 0.990000")), edit("b", (BASE_LINE, "TRUE_BPB = 0.980000"))]
    assert run("--max-cost", "0.00001", "--greedy") == 0
    out = capsys.readouterr().out
    assert "stopping: spend $0.01 reached --max-cost" in out
    assert len(rows(repo)) == 2 and len(fake.requests) == 1
    assert run("--deadline", "0m") == 0
    assert "stopping: the deadline comes before another run could finish" in capsys.readouterr().out
    assert len(fake.requests) == 1


def test_status_line_per_experiment(repo, fake, capsys):
    fake.replies += [edit("lower", (BASE_LINE, "TRUE_BPB = 0.990000"))]
    assert run("--max-experiments", "1", "--greedy") == 0
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("   1 ")]
    assert len(lines) == 1
    assert "0.990000 (-0.010000)  keep" in lines[0] and "exp/h, duty gpu " in lines[0] and "$0.009" in lines[0]
    assert "lower" in lines[0] and "best 0.990000" in lines[0]


def test_descriptions_never_break_a_row(repo, fake):
    fake.replies += [edit("tabs\there\nand a newline", (BASE_LINE, "TRUE_BPB = 0.990000"))]
    assert run("--max-experiments", "1", "--greedy") == 0
    assert rows(repo)[1]["description"] == "tabs here and a newline"
    assert records.format_row("abcdef0", 1.0, 0.0, "keep", "=1+2 lr").endswith("\t'=1+2 lr\n")


SAMPLE_TSV = """commit	val_bpb	memory_gb	status	description
a1b2c3d	0.997900	44.0	keep	baseline
b2c3d4e	0.993200	44.2	keep	increase LR to 0.04
c3d4e5f	1.005000	44.0	discard	switch to GeLU activation
d4e5f6g	0.000000	0.0	crash	double model width (OOM)
e5f6g7h	0.985000	44.5	keep	warmdown 0.6
f6g7h8i	0.990000	44.1	discard	tweak betas
"""


def test_report_on_a_sample_results_tsv(tmp_path, capsys):
    (tmp_path / "results.tsv").write_text(SAMPLE_TSV)
    png = tmp_path / "progress.png"
    assert cli.main(["report", "--tsv", str(tmp_path / "results.tsv"), "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "experiments: 5 after the baseline (6 runs in all), kept 2, crash rate 20%" in out
    assert "baseline 0.997900 -> best 0.985000 (-0.012900, e5f6g7h: warmdown 0.6)" in out
    top = out.split("top improvements:")[1].splitlines()
    assert "warmdown 0.6" in top[1] and "increase LR" in top[2]  # largest gain first
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def start_driver(repo, tmp_path, *args):
    """The driver as a real process (for kill -9 and Ctrl-C), output to tmp_path/driver.out; Ctrl-C
    works as at a terminal (stop_signals_handled)."""
    out = open(tmp_path / "driver.out", "ab")
    with stop_signals_handled():
        return subprocess.Popen([sys.executable, "driver.py", "--tag", "t", *DRIVER_ARGS, *args], cwd=repo,
                                stdout=out, stderr=subprocess.STDOUT)


def wait_for(path, proc):
    for _ in range(600):
        if path.exists() and path.read_text():
            return
        assert proc.poll() is None, "the driver ended early"
        time.sleep(0.05)
    raise AssertionError(f"{path} never appeared")


@pytest.fixture
def slow_once(tmp_path, monkeypatch):
    """Env for the stand-in's MODE slow_once: the first run sleeps, a re-run does not."""
    monkeypatch.setenv("STANDIN_ONCE_FILE", str(tmp_path / "once"))
    monkeypatch.setenv("STANDIN_PID_FILE", str(tmp_path / "training.pid"))
    return tmp_path / "once", tmp_path / "training.pid"


def test_kill_9_mid_experiment_then_restart(repo, fake, tmp_path, slow_once):
    once, pid_file = slow_once
    fake.replies += [edit("slow but good", (MODE_LINE, 'MODE = "slow_once"'), (BASE_LINE, "TRUE_BPB = 0.990000")),
                     edit("better", ("TRUE_BPB = 0.990000", "TRUE_BPB = 0.980000"))]
    proc = start_driver(repo, tmp_path, "--max-experiments", "2", "--greedy")
    wait_for(once, proc)
    wait_for(pid_file, proc)
    training_pid = int(pid_file.read_text())
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 30  # its supervisor's parent-death signal ends the run: no orphan on the GPU
    while not pid_gone(training_pid) and time.time() < deadline:
        time.sleep(0.1)
    assert pid_gone(training_pid), "the orphaned training run outlived its driver"
    assert branch_log(repo)[0] == "initial"  # the branch holds the best while a candidate trains in its worktree
    assert git(repo / "runs/t/slots/gpu", "log", "-1", "--format=%s") == "slow but good"
    restart = start_driver(repo, tmp_path, "--max-experiments", "2", "--greedy")
    assert restart.wait(timeout=60) == 0, (tmp_path / "driver.out").read_text()
    assert [x["description"] for x in rows(repo)] == ["baseline", "slow but good", "better"]
    assert branch_log(repo) == ["better", "slow but good", "initial"]
    assert len(fake.requests) == 2  # the interrupted experiment was re-run, not re-asked
    assert git(repo, "status", "--porcelain", "--untracked-files=no") == ""


def test_ctrl_c_stops_training_cleanly_and_resumes(repo, fake, tmp_path, slow_once):
    once, pid_file = slow_once
    fake.replies += [edit("slow but good", (MODE_LINE, 'MODE = "slow_once"'), (BASE_LINE, "TRUE_BPB = 0.990000"))]
    proc = start_driver(repo, tmp_path, "--max-experiments", "1", "--greedy")
    wait_for(once, proc)
    wait_for(pid_file, proc)
    training_pid = int(pid_file.read_text())
    proc.send_signal(signal.SIGUSR1)  # where is every thread: printed, and the run goes on
    for _ in range(100):
        if "in run_night" in (tmp_path / "driver.out").read_text():
            break
        time.sleep(0.05)
    assert "in run_night" in (tmp_path / "driver.out").read_text() and proc.poll() is None
    proc.send_signal(signal.SIGINT)
    assert exit_code(proc, tmp_path / "driver.out") == 130
    assert pid_gone(training_pid)
    assert "interrupted; `python driver.py --tag t` resumes this run" in (tmp_path / "driver.out").read_text()
    assert [x["description"] for x in rows(repo)] == ["baseline"]  # no half-written row
    assert branch_log(repo) == ["initial"] and git(repo, "status", "--porcelain", "--untracked-files=no") == ""
    restart = start_driver(repo, tmp_path, "--max-experiments", "1", "--greedy")
    assert restart.wait(timeout=60) == 0
    assert [x["description"] for x in rows(repo)] == ["baseline", "slow but good"]
    assert len(fake.requests) == 1


# ---------------------------------------------------------------------------
# The real train.py through the whole loop (CPU, small settings; uses prepared_cache)
# ---------------------------------------------------------------------------

def test_real_train_py_through_the_whole_loop(repo, fake, prepared_cache, monkeypatch):
    """THE REAL train.py and prepare.py (small CAPS constants, 2 s budget, CPU): baseline, one
    LLM edit, commit, run, parse, decide, row."""
    lr_line = use_real_train_py(repo, prepared_cache, monkeypatch)
    fake.replies += [edit("lower Muon lr", (lr_line, lr_line.replace("MATRIX_LR = 0.04", "MATRIX_LR = 0.03")))]
    assert run("--max-experiments", "1", "--greedy", "--timeout", "300", "--fix-attempts", "0") == 0
    check_real_runs(repo, fake)


class Killed(BaseException):
    """Stands for kill -9 at one exact instant (nothing after it runs but `finally` blocks)."""


KILL_POINTS = {  # where -> (module, function): die right after it returns
    "llm.ask": (llm, "ask"), "commit_candidate": (slots, "commit_candidate"),
    "run_training": (training, "run_training"), "sync_tsv": (records, "sync_tsv"),
    "save (final decision)": (experiment, "save")}


@pytest.mark.parametrize("where", KILL_POINTS)
def test_killed_at_any_step_then_restarted(repo, fake, monkeypatch, where):
    """Die right after a step (after the LLM reply, the commit, the run, the rows, the journal
    write of the final decision) and restart: the same rows once each, the kept commit on the
    branch, nothing stray."""
    fake.replies += [edit("lower", (BASE_LINE, "TRUE_BPB = 0.990000")),
                     edit("lower again", ("TRUE_BPB = 0.990000", "TRUE_BPB = 0.980000"))]
    assert run("--max-experiments", "0", "--greedy") == 0
    module, name = KILL_POINTS[where]
    original = getattr(module, name)

    def dies_after(*args, **kwargs):
        result = original(*args, **kwargs)
        if name == "sync_tsv" and len(args[1]) < 2:  # only once the experiment's row is written
            return result
        if name != "save" or any(p.final for p in args[1].in_flight):
            raise Killed
        return result
    monkeypatch.setattr(module, name, dies_after)
    with pytest.raises(Killed):
        run("--max-experiments", "2", "--greedy")
    monkeypatch.setattr(module, name, original)
    if where == "llm.ask":
        fake.replies.insert(0, edit("lower", (BASE_LINE, "TRUE_BPB = 0.990000")))  # asked again
    assert run("--max-experiments", "2", "--greedy") == 0
    assert [x["description"] for x in rows(repo)] == ["baseline", "lower", "lower again"]
    assert branch_log(repo) == ["lower again", "lower", "initial"]
    assert git(repo, "status", "--porcelain", "--untracked-files=no") == ""


def test_two_summary_blocks_are_refused_and_one_is_read_by_regex():
    settings = {"max_seq_len": 2048, "time_budget": 5, "eval_tokens": 20971520}
    block = "---\nval_bpb:          0.997900\npeak_vram_mb:     45060.2\nmax_seq_len: 2048\ntime_budget: 5\n" \
            "eval_tokens: 20971520\nseed:             42\n"
    log = "step 00010 | loss: 3.2\n" + block
    assert training.summary_failure(log, 0, settings, 42) == ""
    assert training.parse_summary(training.summary_blocks(log)[0])["peak_vram_mb"] == "45060.2"
    assert training.summary_failure("no summary at all\n", 0, settings, 42) == "no val_bpb in the output (exit code 0)"
    two = log + "more output\n" + block.replace("0.997900", "0.900000")  # a second, lower value
    assert training.summary_failure(two, 0, settings, 42).startswith("refused: more than one summary block")
    doubled = log.replace("peak_vram_mb", "val_bpb: 0.5\npeak_vram_mb")  # two values in one block
    assert training.summary_failure(doubled, 0, settings, 42).startswith("refused: more than one summary block")
    for bad in ("-0.5", "0.000000", "0", "100.0", "1e9"):
        assert "is impossible" in training.summary_failure(log.replace("0.997900", bad), 0, settings, 42), bad
    assert training.number("nan") != training.number("nan") and training.number("n/a") != training.number("n/a")


def test_a_failing_baseline_stops_and_resumes_from_the_committed_fix(repo, fake):
    (repo / "train.py").write_text((repo / "train.py").read_text().replace(MODE_LINE, 'MODE = "crash"'))
    git(repo, "commit", "-q", "-am", "broken")
    with pytest.raises(SystemExit) as stop:
        run("--greedy")
    assert "the baseline train.py failed: no val_bpb" in str(stop.value) and "Fix train.py, commit it" in str(stop.value)
    assert fake.requests == [] and rows(repo)[0]["status"] == "crash"
    (repo / "train.py").write_text((repo / "train.py").read_text().replace('MODE = "crash"', MODE_LINE))
    git(repo, "commit", "-q", "-am", "fixed")
    assert run("--max-experiments", "0", "--greedy") == 0
    assert [(x["description"], x["status"]) for x in rows(repo)] == [("baseline [crash: no val_bpb: train.py exited "
                                                                      "with code 1 before its model was scored]", "crash"), ("baseline", "keep")]
    assert branch_log(repo)[0] == "fixed" and MODE_LINE in (repo / "train.py").read_text()
    assert all(json.loads((repo / "runs/t/journal.json").read_text())["groups"].values())  # no empty group
    assert "experiments: 0 after the baseline (2 runs in all)" in report(repo / "results.tsv")[0]


def test_results_tsv_follows_the_journal_torn_rows_completed_foreign_lines_set_aside(tmp_path):
    tsv = tmp_path / "results.tsv"
    rows_ = [records.format_row("abcdef0123", 0.99, 2048.0, "keep", "a"),
             records.format_row("bcdef01234", 0.98, 2048.0, "keep", "b")]
    assert records.sync_tsv(tsv, []) == "" and tsv.read_text() == records.TSV_HEADER  # created with the header
    tsv.write_text(records.TSV_HEADER + rows_[0] + "bcdef01\t0.98")  # killed mid-write
    assert records.sync_tsv(tsv, rows_) == ""
    assert tsv.read_text() == records.TSV_HEADER + "abcdef0\t0.990000\t2.0\tkeep\ta\n" + rows_[1]
    with open(tsv, "a") as f:
        f.write("1234567\t0.500000\t1.0\tkeep\tnot the driver's\n")
    note = records.sync_tsv(tsv, rows_)
    assert "results.tsv held lines the driver did not write" in note
    assert tsv.read_text() == records.TSV_HEADER + "".join(rows_)
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("results-foreign-")]
    assert len(aside) == 1 and "not the driver's" in aside[0].read_text()  # nothing is deleted


def test_the_package_imports_run_one_way():
    """No module of the package imports one that imports it back (also inside a function): each
    can be read, and loaded, on its own terms."""
    import ast
    package = Path(cli.__file__).parent
    graph = {}
    for path in package.glob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "autoresearch":
                names |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("autoresearch."):
                names.add(node.module.split(".")[1])
        graph[path.stem] = names & {p.stem for p in package.glob("*.py")}

    def reaches(source, target, seen):
        """Whether `source` imports `target`, directly or through other modules."""
        seen.add(source)
        return any(nxt == target or nxt not in seen and reaches(nxt, target, seen) for nxt in graph[source])
    assert [(a, b) for a in sorted(graph) for b in sorted(graph[a]) if reaches(b, a, set())] == []
