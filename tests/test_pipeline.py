"""The pipeline (issue 10): proposals made while runs train, slots (one per GPU) in their own
worktrees, proposals re-applied to a best that moved, the stale-base rule, parallel runs, and
kill -9 with several runs in flight. The stand-in train.py sleeps SLEEP_S to "train".
Run: python -m pytest tests/test_pipeline.py"""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from driver_helpers import (BASE_LINE, MODE_LINE, STANDIN_ENV, branch_log, fake, git, journal, noisy, pid_gone,  # noqa: F401
                            repo, rows)
import pytest

from fake_anthropic import edit
from autoresearch import cli, experiment, llm, loop, records, slots, training

SLEEP_LINE = "SLEEP_S = 0.0"
PIPELINE = ["--allow-cpu", "--sandbox", "off", *STANDIN_ENV]


def run(*args):
    return cli.main(["--tag", "t", *PIPELINE, *args])


def shown_train_py(request):
    """The train.py a request shows the model (the best when it was asked)."""
    return request["messages"][0]["content"][0]["text"]


def slow_baseline(repo, seconds="1.0"):
    """Every run "trains" this long (the baseline commit's SLEEP_S, inherited by the ideas)."""
    path = repo / "train.py"
    path.write_text(path.read_text().replace(SLEEP_LINE, f"SLEEP_S = {seconds}"))
    git(repo, "commit", "-q", "-am", "slow stand-in")


def test_the_next_idea_is_asked_while_a_run_trains(repo, fake):
    """One slot: the first idea is asked while the baseline trains, the second while the first
    trains (shown what is in flight), and re-applied to the new best before it starts."""
    slow_baseline(repo)
    seen = []

    def idea(name, search, replace):
        return lambda request: seen.append(len(rows(repo))) or edit(name, (search, replace))
    fake.replies += [idea("first", BASE_LINE, "TRUE_BPB = 0.990000"), idea("second", "DATA_ORDER = 0", "DATA_ORDER = 5")]
    assert run("--max-experiments", "2", "--greedy") == 0
    assert seen == [0, 1]  # results.tsv had no row yet, then only the baseline's
    second = json.dumps(fake.requests[1]["messages"])
    assert "In flight" in second and "#1: first" in second and "+TRUE_BPB = 0.990000" in second
    assert [(x["description"], x["status"]) for x in rows(repo)] == [
        ("baseline", "keep"), ("first", "keep"), ("second", "discard")]
    first = git(repo, "rev-parse", "autoresearch/t")
    assert git(repo, "rev-parse", "refs/autoresearch/t/discarded/0002^") == first  # rebased onto "first"


def test_a_proposal_whose_edits_no_longer_apply_is_asked_again(repo, fake, capsys):
    """Proposed against the baseline while the first idea trains; the first idea is kept and changed
    the very line the second edits: re-applying fails, so the model is asked again (no GPU time)."""
    slow_baseline(repo)
    fake.replies += [edit("first", (BASE_LINE, "TRUE_BPB = 0.990000")),
                     edit("same line", (BASE_LINE, "TRUE_BPB = 0.985000")),
                     edit("asked again", ("TRUE_BPB = 0.990000", "TRUE_BPB = 0.980000"))]
    assert run("--max-experiments", "3", "--greedy") == 0
    out = capsys.readouterr().out
    assert "same line: its edits no longer apply to the new best; asking again" in out
    assert "total: 3 experiments decided" in out  # (the dropped proposal had a number, and no decision)
    assert [x["description"] for x in rows(repo)] == ["baseline", "first", "asked again"]
    assert len(fake.requests) == 3 and not (repo / "runs/t/0002/train.log").exists()


def test_slots_train_side_by_side_each_on_its_gpu_in_its_worktree(repo, fake):
    """The baseline's seeds train side by side from the start, one on each GPU (its first run and a
    noise run at once, then the third)."""
    slow_baseline(repo)
    assert run("--max-experiments", "0", "--gpus", "0,1", "--noise-runs", "3") == 0
    logs = [(repo / "runs/t/0000" / name).read_text() for name in ("train.log", "train-2.log")]
    assert sorted(log.split("gpu: ")[1].split("\n")[0] for log in logs) == ["0", "1"]
    st = journal(repo)
    assert set(st["slot_seconds"]) == {"gpu0", "gpu1"} and all(v > 0 for v in st["slot_seconds"].values())
    assert not (repo / "runs/t/slots/gpu0").exists() and not (repo / "runs/t/slots/gpu1").exists()
    assert len(git(repo, "worktree", "list").splitlines()) == 1  # the slots' worktrees removed at the end
    assert [x["description"].split(" (")[0] for x in rows(repo)] == ["baseline", "noise run 2/3", "noise run 3/3"]
    (a0, a1), (b0, b1) = [map(float, log.split("trained from ")[1].split("\n")[0].split(" to ")) for log in logs]
    assert a0 < b1 and b0 < a1  # the two runs' training overlapped
    assert git(repo, "status", "--porcelain", "--untracked-files=no") == ""
    summary = cli.report(repo / "results.tsv", repo / "runs/t/journal.json")
    throughput = next(line for line in summary if line.startswith("throughput:"))
    assert "experiments per hour" in throughput and "gpu0 " in throughput and "gpu1 " in throughput


def test_a_restart_with_other_slots_ends_every_run_the_killed_driver_left(repo, fake):
    """A --gpus 0,1,2,3 driver killed with runs in flight, restarted without --gpus: the runs of
    slots it no longer has are ended too (every pid file of the run), and stale worktrees pruned."""
    assert run("--max-experiments", "0", "--greedy") == 0
    left = []
    for name in ("gpu1", "gpu3"):  # what the killed driver's slots were training
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", "train.py"],
                                start_new_session=True)
        (repo / "runs/t/slots").mkdir(parents=True, exist_ok=True)
        (repo / f"runs/t/slots/{name}.pid").write_text(str(proc.pid))
        left.append(proc)
    git(repo, "worktree", "add", "-q", "--detach", str(repo / "runs/t/slots/gpu3"), "HEAD")
    subprocess.run(["rm", "-rf", str(repo / "runs/t/slots/gpu3")], check=True)  # (its folder gone, git's entry not)
    assert run("--max-experiments", "0", "--greedy") == 0
    for proc in left:
        assert proc.wait(timeout=30) is not None
    assert not list((repo / "runs/t/slots").glob("*.pid"))
    assert len(git(repo, "worktree", "list").splitlines()) == 1


def starts_with_company(monkeypatch):
    """Every run started, as ((experiment, role, seed), what the slots were training then)."""
    started, start = [], slots.start

    def record_start(slot, ctx, night, job, events, *args, **kwargs):
        started.append((job[:3], [s.job[:2] for s in ctx.slots if s.job]))
        return start(slot, ctx, night, job, events, *args, **kwargs)
    monkeypatch.setattr(slots, "start", record_start)
    return started


def test_ideas_train_beside_the_baseline_and_are_decided_once_its_numbers_are_in(noisy, fake, monkeypatch):
    """Four slots from the first minute: the baseline's three seeds and the first idea train at once
    (the idea proposed against the baseline's code); the idea is decided after the baseline."""
    slow_baseline(noisy, "2.0")
    fake.replies += [edit("early", (BASE_LINE, "TRUE_BPB = 0.900000"))]
    started = starts_with_company(monkeypatch)
    assert run("--max-experiments", "1", "--gpus", "0,1,2,3", "--noise-runs", "3") == 0
    baseline = [job for job, _ in started if job[0] == 0]
    assert [job[1] for job in baseline] == ["candidate", "noise", "noise"]
    idea, beside = next((job, beside) for job, beside in started if job[0] == 1)
    assert idea == (1, "candidate", 42) and (0, "candidate") in beside  # the baseline still training
    r = rows(noisy)
    assert [x["description"].split(" (")[0] for x in r[:3]] == ["baseline", "noise run 2/3", "noise run 3/3"]
    assert [x for x in r if x["description"].startswith("early")][0]["status"] == "keep"


def test_a_win_on_a_stale_base_is_re_run_on_the_new_best(repo, fake):
    """Two slots: "fast" (a big gain) and "slow" (a smaller one, on another line) both start from the
    baseline. "fast" ends first and is kept; "slow" then beats its parent, the baseline, which is
    no longer the best: it is never kept on it, but re-applied to the new best and run again."""
    slow_baseline(repo, "0.5")
    fake.replies += [edit("fast", (BASE_LINE, "TRUE_BPB = 0.980000")),
                     edit("slow", ("BONUS = 0.0", "BONUS = 0.005"), ("SLEEP_S = 0.5", "SLEEP_S = 3.0"))]
    assert run("--max-experiments", "2", "--greedy", "--gpus", "0,1", "--noise-runs", "1") == 0
    r = rows(repo)
    assert [(x["description"].split(" [")[0], x["val_bpb"], x["status"]) for x in r] == [
        ("baseline", "1.000000", "keep"), ("fast", "0.980000", "keep"),
        ("slow", "0.995000", "discard"),  # beat the baseline, its parent; never kept on it
        ("slow", "0.975000", "keep")]     # the same edits on "fast": kept
    assert "ahead of its parent, which was no longer the best: re-run on the new best" in r[2]["description"]
    assert r[2]["commit"] != r[3]["commit"] and branch_log(repo)[:2] == ["slow", "fast"]
    assert journal(repo)["in_flight"] == [] and journal(repo)["best"]["description"] == "slow"


def test_a_gain_to_confirm_on_a_stale_base_is_confirmed_there_then_moved_with_its_runs(noisy, fake):
    """Noise-aware: "slow" is ahead of the baseline by less than the one-run margin, and the
    baseline is no longer the best when it ends. It is confirmed on the baseline (its parent, whose
    numbers are known) first, then moved to the new best with its runs carried over: one run there
    decides it, not a confirmation again."""
    slow_baseline(noisy, "0.5")
    fake.replies += [edit("fast", (BASE_LINE, "TRUE_BPB = 0.980000")),
                     edit("slow", ("BONUS = 0.0", "BONUS = 0.003"), ("SLEEP_S = 0.5", "SLEEP_S = 3.0"))]
    assert run("--max-experiments", "2", "--gpus", "0,1", "--noise-runs", "3") == 0
    r = rows(noisy)
    slow = [x for x in r if x["description"].split(" [")[0].split(": ")[-1] == "slow"]
    stale = [x for x in slow if x["commit"] == slow[0]["commit"]]
    assert len(stale) == 2 and all(x["status"] == "discard" for x in stale)  # its first run and a repeat
    assert "ahead of its parent, which was no longer the best" in stale[0]["description"]
    assert float(stale[0]["val_bpb"]) > min(float(x["val_bpb"]) for x in r[:3]) - 0.003  # (no clear win)
    on_best = [x for x in slow if x["commit"] != slow[0]["commit"]]
    assert [x["status"] for x in on_best] == ["keep"]  # one run on the new best
    assert branch_log(noisy)[:2] == ["slow", "fast"]


def deadline_near_from_the_first_result(monkeypatch):
    """The deadline is near from the moment an idea's first run has a result on (and stays so)."""
    results = []

    def deadline_near(ctx, night):
        results.extend(p.n for p in night.in_flight if p.kind == "candidate" and p.runs)
        return bool(results)
    monkeypatch.setattr(loop, "deadline_near", deadline_near)


def test_a_confirmation_runs_its_repeats_side_by_side_on_slots_nothing_needs(noisy, fake, monkeypatch):
    """Three slots, one idea, ahead of the baseline by less than the one-run margin. No other run
    needs the slots, so its third run trains beside its second instead of after it, and the rule
    decides on all three (one slot: one after the other, as the sequential driver)."""
    slow_baseline(noisy, "1.0")
    fake.replies += [edit("marginal", ("BONUS = 0.0", "BONUS = 0.0025"))]
    started = starts_with_company(monkeypatch)
    assert run("--max-experiments", "1", "--gpus", "0,1,2", "--noise-runs", "3") == 0
    idea = [(job, beside) for job, beside in started if job[0] == 1]
    assert [job[1:] for job, _ in idea] == [("candidate", 42), ("candidate", 45), ("candidate", 46)]
    assert (1, "candidate") in idea[2][1]  # the second still training when the third started
    r = [x for x in rows(noisy) if "marginal" in x["description"]]
    assert [x["status"] for x in r] == ["keep"] * 3 and "confirmed: mean 0.997462 over 3 seeds" in r[0]["description"]


def test_no_run_starts_past_the_deadline_and_an_unfinished_confirmation_says_so(noisy, fake, monkeypatch):
    """Four slots; the deadline is near from the idea's first result on: none of the repeats its
    confirmation asks for may start (they could not end in time), and it is recorded unconfirmed."""
    slow_baseline(noisy, "1.0")
    deadline_near_from_the_first_result(monkeypatch)
    fake.replies += [edit("marginal", ("BONUS = 0.0", "BONUS = 0.0025"))]
    started, start = [], slots.start
    monkeypatch.setattr(slots, "start", lambda slot, ctx, night, job, events, *args, **kwargs:
                        started.append(job[:3]) or start(slot, ctx, night, job, events, *args, **kwargs))
    assert run("--max-experiments", "1", "--gpus", "0,1,2,3", "--noise-runs", "3") == 0
    assert [job for job in started if job[0] == 1] == [(1, "candidate", 42)]
    r = [x for x in rows(noisy) if "marginal" in x["description"]]
    assert [x["status"] for x in r] == ["discard"] and "unconfirmed: the deadline came before" in r[0]["description"]
    assert journal(noisy)["in_flight"] == []


def test_a_repeat_that_crashes_ends_the_confirmation_even_with_a_repeat_run_ahead(noisy, fake):
    """Three slots: the marginal idea's repeats (seeds 45 and 46) train side by side, and the one on
    seed 45 crashes. As one after the other, the crash ends the confirmation: the run on seed 46,
    started ahead of it, is recorded but not counted (it would have confirmed the idea)."""
    slow_baseline(noisy, "1.0")
    fake.replies += [edit("flaky", ("BONUS = 0.0", "BONUS = 0.0025"), (MODE_LINE, 'MODE = "flaky"'))]
    assert run("--max-experiments", "1", "--gpus", "0,1,2", "--noise-runs", "3") == 0
    r = [x for x in rows(noisy) if "flaky" in x["description"]]
    assert sorted(x["status"] for x in r) == ["crash", "discard", "discard"]
    assert "(a repeat crashed)" in r[0]["description"] and branch_log(noisy)[0] != "flaky"


def test_runs_on_an_earlier_best_are_carried_and_an_idea_is_given_up_after_the_cap():
    """What an idea's runs on the best it was measured on say, moved onto its parent now by the
    difference of the two bests' means (a crash ends what counts, as in a confirmation); after
    MAX_REBASES moves it is not moved again."""
    from types import SimpleNamespace
    run_on = lambda attempt, seed, val: records.Run("candidate", seed, "c", attempt, val, 0.0, 1.0, "", "")  # noqa: E731
    p = records.Experiment(1, "candidate", "idea", "/x/0001", "/x/0001/candidate-2.py", None, 0, attempt=1,
                           parent="new", runs=[run_on(0, 42, 0.995), run_on(0, 45, 0.997), run_on(0, 46, None),
                                               run_on(0, 47, 0.990), run_on(1, 42, 0.978)],
                           rebased_attempts=[0], rebased_from=[[0, "old"]])
    night = SimpleNamespace(groups={"old": [1.0, 1.002], "new": [0.98]})
    assert experiment.carried(night, p) == pytest.approx([0.995 - 0.021, 0.997 - 0.021])
    # together they beat the new best, but its own run on the new best does not: no keep
    p.runs[-1].val_bpb = 0.981
    ctx = SimpleNamespace(slots=[], fix_attempts=2, greedy=True)
    night.best, night.best_vals, night.sigma, night.run_counts = SimpleNamespace(commit="new"), [0.98], None, {
        "noise": 0, "total": 10}
    assert experiment.next_step(ctx, night, p) == (
        "record", "discard", "ahead on an earlier best, but not on this one (mean 0.981000 vs 0.980000)")
    p.rebased_attempts = list(range(experiment.MAX_REBASES))
    assert experiment.stale_keep(None, night, p) == (
        "record", "discard", f"ahead of its parent, but the best moved {experiment.MAX_REBASES} times while it was "
                             "measured; not re-run again")


def test_runs_side_by_side_never_share_a_log():
    """Logs are named by the first name free: runs that end out of order, or a kill that re-runs
    only some of them, never overwrite a recorded run's log."""
    p = records.Experiment(1, "candidate", "idea", "/x/0001", "/x/0001/candidate.py", "c", 0, parent="b",
                           runs=[records.Run("candidate", 42, "c", 0, 0.99, 0.0, 1.0, "", "/x/0001/train.log"),
                                 records.Run("candidate", 46, "c", 0, 0.98, 0.0, 1.0, "", "/x/0001/train-3.log")])
    assert str(experiment.free_log(p, [])) == "/x/0001/train-2.log"
    assert str(experiment.free_log(p, [Path("/x/0001/train-2.log")])) == "/x/0001/train-4.log"


def marginal_then_late_idea(noisy, fake, monkeypatch, log, wait_s, *late_edits):
    """Two slots, two ideas asked at once: a marginal one, and a late one whose answer waits until
    the marginal idea's `log` exists (or wait_s). Returns the jobs started and the marginal's number."""
    def late_idea(request):
        deadline = time.time() + wait_s
        while not list(noisy.glob(f"runs/t/000[12]/{log}")) and time.time() < deadline:
            time.sleep(0.02)
        return edit("late", ("DATA_ORDER = 0", "DATA_ORDER = 3"), *late_edits)
    fake.replies += [edit("marginal", ("BONUS = 0.0", "BONUS = 0.0025")), late_idea]
    started, start = [], slots.start
    monkeypatch.setattr(slots, "start", lambda slot, ctx, night, job, events, *args, **kwargs:
                        started.append(job[:3]) or start(slot, ctx, night, job, events, *args, **kwargs))
    assert run("--max-experiments", "2", "--gpus", "0,1", "--noise-runs", "3") == 0
    marginal = 1 if (noisy / "runs/t/0001/train-2.log").exists() else 2  # (the two asks race to the server)
    return started, marginal


def test_no_repeat_runs_ahead_on_a_slot_an_idea_is_on_its_way_to(noisy, fake, monkeypatch):
    """Two slots. The marginal idea's second run starts while the second idea is still being asked
    for: the free slot is kept for that idea (no third run ahead on it), and the rule decides on
    two runs, as one after the other. (The second idea trains longer, so its slot does not free up
    while the marginal idea's second run trains: a repeat may run ahead on a slot that frees.)"""
    slow_baseline(noisy, "1.0")
    started, marginal = marginal_then_late_idea(noisy, fake, monkeypatch, "train-2.log", 60,
                                                ("SLEEP_S = 1.0", "SLEEP_S = 4.0"))
    ideas = [job for job in started if job[0] > 0]
    assert ideas == [(marginal, "candidate", 42), (marginal, "candidate", 45), (3 - marginal, "candidate", 42)]
    assert "marginal [confirmed: mean 0.997429 over 2 seeds" in "\n".join(x["description"] for x in rows(noisy))


def test_a_failed_baseline_with_an_idea_already_proposed_resumes_from_the_fix(repo, fake):
    """The pipeline asks for an idea while the baseline trains; the baseline then crashes. The idea,
    proposed against broken code, is dropped; after the fix the baseline runs, then a new idea."""
    path = repo / "train.py"
    path.write_text(path.read_text().replace(MODE_LINE, 'MODE = "crash"').replace(SLEEP_LINE, "SLEEP_S = 1.0"))
    git(repo, "commit", "-q", "-am", "broken")
    fake.replies += [edit("early idea", ("DATA_ORDER = 0", "DATA_ORDER = 1")),
                     edit("idea after the fix", (BASE_LINE, "TRUE_BPB = 0.990000"))]
    with pytest.raises(SystemExit, match="the baseline train.py failed"):
        run("--greedy", "--max-experiments", "2")
    assert len(fake.requests) == 1 and journal(repo)["in_flight"] == []
    path.write_text(path.read_text().replace('MODE = "crash"', MODE_LINE))
    git(repo, "commit", "-q", "-am", "fixed")
    assert run("--greedy", "--max-experiments", "3") == 0  # (numbers 1 and 2: the dropped idea, the new baseline)
    assert [(x["description"].split(" [")[0], x["status"]) for x in rows(repo)] == [
        ("baseline", "crash"), ("baseline", "keep"), ("idea after the fix", "keep")]


KILL_POINTS = {"llm.ask": (llm, "ask"), "commit_candidate": (slots, "commit_candidate"),
               "run_training": (training, "run_training"), "save (final decision)": (experiment, "save")}


def knob_idea(request):
    """The next of two ideas on separate lines, chosen from what the model is shown (the best and
    what is in flight), as a model would: a re-ask after a kill gets the same answer."""
    seen = json.dumps(request["messages"])
    if "BONUS = 0.0\\n" in seen and ": bonus" not in seen:
        return edit("bonus", ("BONUS = 0.0", "BONUS = 0.010000"))
    return edit("reorder", ("DATA_ORDER = 0", "DATA_ORDER = 1"))


@pytest.mark.parametrize("where", KILL_POINTS)
def test_killed_at_any_step_with_the_pipeline_then_restarted(repo, fake, where):
    """The pipeline's windows: a reply, a commit, a run or a decision cut short while another idea
    is being asked; the restart gives every row once and the same branch."""
    slow_baseline(repo, "0.5")
    fake.replies += [knob_idea] * 12  # a reply whose request the kill abandoned is asked again
    assert run("--max-experiments", "0", "--greedy") == 0
    module, name = KILL_POINTS[where]
    original = getattr(module, name)

    def dies_after(*args, **kwargs):
        result = original(*args, **kwargs)
        if name != "save" or any(p.final and p.kind == "candidate" for p in args[1].in_flight):
            raise Killed
        return result
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(module, name, dies_after)
        with pytest.raises(Killed):
            run("--max-experiments", "2", "--greedy")
    time.sleep(1.0)  # a thread the kill abandoned (an LLM request, a run) ends
    assert run("--max-experiments", "2", "--greedy") == 0
    assert sorted(x["description"] for x in rows(repo)) == ["baseline", "bonus", "reorder"]
    assert branch_log(repo)[0] == "bonus" and git(repo, "status", "--porcelain", "--untracked-files=no") == ""


class Killed(BaseException):
    """Stands for kill -9 at one exact instant."""


def test_a_run_cut_by_a_kill_resumes_on_the_code_its_decision_is_about(repo, fake):
    """Two slots: "fast" is kept while "slow" trains on the baseline; the driver dies at that
    instant. At the restart "slow" is re-applied to "fast" and must train that code (not the commit
    it had made on the baseline), so its keep holds both changes and the branch drops no keep."""
    slow_baseline(repo, "0.5")
    fake.replies += [edit("fast", (BASE_LINE, "TRUE_BPB = 0.980000")),
                     edit("slow", ("BONUS = 0.0", "BONUS = 0.030000"), ("SLEEP_S = 0.5", "SLEEP_S = 3.0"))]
    assert run("--max-experiments", "0", "--greedy", "--noise-runs", "1") == 0
    original = experiment.save

    def dies_once_fast_is_decided(ctx, night):
        original(ctx, night)
        if any(p.final and p.description == "fast" for p in night.in_flight):
            raise Killed
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(experiment, "save", dies_once_fast_is_decided)
        with pytest.raises(Killed):
            run("--max-experiments", "2", "--greedy", "--gpus", "0,1")
    time.sleep(1.0)
    assert run("--max-experiments", "2", "--greedy", "--gpus", "0,1") == 0
    assert [(x["description"].split(" [")[0], x["val_bpb"]) for x in rows(repo)] == [
        ("baseline", "1.000000"), ("fast", "0.980000"), ("slow", "0.950000")]
    assert branch_log(repo)[:3] == ["slow", "fast", "slow stand-in"]


def test_no_keep_drops_an_earlier_keep_from_the_branch(repo, fake, monkeypatch):
    """The invariant checked before the branch moves: were a run to train a commit made on an older
    best (as one did before the fix above), its keep is refused and the branch keeps "fast"."""
    rebase = loop.rebase

    def keeps_the_old_commit(ctx, night, p):
        commit, done = p.commit, rebase(ctx, night, p)
        p.commit = commit
        return done
    monkeypatch.setattr(loop, "rebase", keeps_the_old_commit)
    with pytest.raises(AssertionError):
        test_a_run_cut_by_a_kill_resumes_on_the_code_its_decision_is_about(repo, fake)
    r = rows(repo)
    assert r[2]["status"] == "discard" and "refused: its commit does not hold the best's code" in r[2]["description"]
    assert branch_log(repo)[:2] == ["fast", "slow stand-in"]


def test_kill_9_with_two_runs_in_flight_then_restart(repo, fake, tmp_path):
    """Both slots training when the driver dies: both groups are ended at the restart and their
    runs done again; every row once. (The kill may fall between the server's answer for "b" and its
    journal entry: the restart then asks again, and gets the same idea.)"""
    b = edit("b", ("DATA_ORDER = 0", "DATA_ORDER = 1"), (SLEEP_LINE, "SLEEP_S = 4.0"))
    fake.replies += [edit("a", (BASE_LINE, "TRUE_BPB = 0.990000"), (SLEEP_LINE, "SLEEP_S = 4.0")), b, b]
    command = [sys.executable, "driver.py", "--tag", "t", *PIPELINE, "--gpus", "0,1", "--noise-runs", "1",
               "--max-experiments", "2", "--greedy"]
    out = open(tmp_path / "driver.out", "ab")
    proc = subprocess.Popen(command, cwd=repo, stdout=out, stderr=subprocess.STDOUT)
    pid_files = [repo / "runs/t/slots/gpu0.pid", repo / "runs/t/slots/gpu1.pid"]
    for _ in range(600):
        if all(p.exists() and p.read_text() for p in pid_files):
            break
        assert proc.poll() is None, (tmp_path / "driver.out").read_text()
        time.sleep(0.05)
    training = [int(p.read_text()) for p in pid_files]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    restart = subprocess.Popen(command, cwd=repo, stdout=out, stderr=subprocess.STDOUT)
    for pid in training:
        for _ in range(100):
            if pid_gone(pid):
                break
            time.sleep(0.1)
        assert pid_gone(pid), "a training group of the killed driver outlived the restart"
    assert restart.wait(timeout=120) == 0, (tmp_path / "driver.out").read_text()
    descriptions = [x["description"] for x in rows(repo)]
    assert sorted(descriptions) == ["a", "b", "baseline"] and len(fake.requests) in (2, 3)
