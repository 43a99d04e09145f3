"""The driver (issue 5): decisions against a measured noise floor. The stand-in train.py's
val_bpb is the true value of its code (TRUE_BPB) plus NOISE_STD times a draw seeded by
AUTORESEARCH_SEED and DATA_ORDER, so every outcome below is deterministic.
Run: python -m pytest tests/test_driver_noise.py"""

import json
import random
import re

import pytest

from driver_helpers import BASE_LINE, MODE_LINE, branch_log, fake, git, journal, noisy, repo, rows, run  # noqa: F401
from autoresearch import decisions, training
from autoresearch.report import report
from fake_anthropic import edit

ORDER_LINE = "DATA_ORDER = 0"
SEED_LINE = 'seed = int(os.environ.get("AUTORESEARCH_SEED", "42"))'




def test_noise_floor_measured_at_start_and_clear_gain_kept_at_once(noisy, fake, capsys):
    fake.replies += [edit("clear gain", (BASE_LINE, "TRUE_BPB = 0.995000"))]
    assert run("--max-experiments", "1") == 0
    r = rows(noisy)
    assert [x["description"] for x in r] == ["baseline", "noise run 2/3 (seed 43): baseline",
                                             "noise run 3/3 (seed 44): baseline", "clear gain"]
    assert [x["status"] for x in r] == ["keep"] * 4
    sigma = journal(noisy)["sigma"]
    baseline = [float(x["val_bpb"]) for x in r[:3]]
    mean = sum(baseline) / 3
    assert sigma == pytest.approx((sum((v - mean) ** 2 for v in baseline) / 2) ** 0.5, abs=1e-6)
    assert 0.0005 < sigma < 0.002  # the stand-in's true noise is 0.001
    out = capsys.readouterr().out
    status = [line for line in out.splitlines() if line.startswith("   1 ")]
    assert f"sigma {sigma:.6f}" in status[0]  # the status line shows the noise floor
    assert branch_log(noisy)[0] == "clear gain"


def test_small_real_gain_is_confirmed_and_kept(noisy, fake):
    fake.replies += [edit("small gain", (BASE_LINE, "TRUE_BPB = 0.998000"))]  # 1.7 sigma: below the one-run margin
    assert run("--max-experiments", "1") == 0
    r = rows(noisy)[3:]
    assert [x["status"] for x in r] == ["keep", "keep"]
    assert r[0]["description"].startswith("small gain [confirmed: mean 0.99")
    assert r[1]["description"] == "repeat 2/3 (seed 45): small gain"
    assert r[0]["commit"] == r[1]["commit"] == git(noisy, "rev-parse", "--short=7", "autoresearch/t")
    st = journal(noisy)
    assert len(st["groups"][st["best"]["commit"]]) == 2 and st["gpu_s"]["noise"] > 0


def test_noise_only_gain_is_rejected_after_confirmation(noisy, fake):
    # DATA_ORDER has no true effect; order 25 happens to look better on its first run
    fake.replies += [edit("reshuffle the data", (ORDER_LINE, "DATA_ORDER = 25"))]
    assert run("--max-experiments", "1") == 0
    r = rows(noisy)[3:]
    assert [x["status"] for x in r] == ["discard"] * 3
    assert float(r[0]["val_bpb"]) < min(float(x["val_bpb"]) for x in rows(noisy)[:3])  # a lucky first run
    assert "[not confirmed: mean" in r[0]["description"]
    assert [x["description"].split(":")[0] for x in r[1:]] == ["repeat 2/3 (seed 45)", "repeat 3/3 (seed 46)"]
    assert journal(noisy)["wins_rejected"] == 1
    assert branch_log(noisy)[0] == "noisy stand-in"
    summary = report(noisy / "results.tsv", noisy / "runs/t/journal.json")
    assert "wins rejected as not confirmed: 1" in summary
    assert any(line.startswith("GPU time:") and "noise handling" in line for line in summary)


def test_greedy_keeps_the_same_lucky_noise(noisy, fake):
    fake.replies += [edit("reshuffle the data", (ORDER_LINE, "DATA_ORDER = 25"))]
    assert run("--max-experiments", "1", "--greedy") == 0
    assert [x["status"] for x in rows(noisy)] == ["keep", "keep"]  # no noise runs, no confirmation


def test_best_is_repeated_when_it_has_fewer_runs(noisy, fake):
    """A best kept at once has one run; confirming a marginal candidate against it re-runs it
    too, and the best's mean sharpens with each repeat."""
    fake.replies += [edit("clear gain", (BASE_LINE, "TRUE_BPB = 0.995000")),
                     edit("small gain on top", ("TRUE_BPB = 0.995000", "TRUE_BPB = 0.994000"),
                          (ORDER_LINE, "DATA_ORDER = 3"))]
    assert run("--max-experiments", "2") == 0
    r = rows(noisy)
    first = git(noisy, "rev-parse", "--short=7", "autoresearch/t~1")
    assert [(x["description"].split(":")[0], x["status"]) for x in r[4:]] == [
        ("small gain on top [confirmed", "keep"), ("repeat 2/3 (seed 45)", "keep"),
        ("repeat of best (seed 46)", "keep"), ("repeat 3/3 (seed 47)", "keep")]
    assert r[6]["commit"] == r[3]["commit"] == first and r[6]["description"].endswith(": clear gain")
    st = json.loads((noisy / "runs/t/journal.json").read_text())
    assert [len(v) for v in st["groups"].values()] == [3, 2, 3]  # baseline, clear gain (+1 repeat), new best
    assert branch_log(noisy)[:2] == ["small gain on top", "clear gain"]


@pytest.mark.parametrize("variant", ["default", "hard-coded", "printed"])
def test_a_seed_only_change_is_never_kept(noisy, fake, variant):
    edits = {
        "default": edit("seed 7", ('"AUTORESEARCH_SEED", "42"', '"AUTORESEARCH_SEED", "7"')),
        "hard-coded": edit("seed 7", (SEED_LINE, "seed = 7")),
        # with an unrelated docstring edit it passes validation, then train.py prints seed 7
        "printed": edit("seed 7", (SEED_LINE, "seed = 7"), ("Stand-in train.py", "Stand-in train.py (seed 7)")),
    }
    fake.replies += [edits[variant]] * 3
    assert run("--max-experiments", "1", "--fix-attempts", "0") == 0
    r = rows(noisy)[3:]
    assert all(x["status"] != "keep" for x in r)
    if variant == "printed":
        assert "refused: the summary reports seed 7" in r[0]["description"]
    else:
        assert r == [] and len(fake.requests) == 3
    assert branch_log(noisy)[0] == "noisy stand-in"


def test_noise_estimate_is_persisted_across_a_restart(noisy, fake, capsys):
    assert run("--max-experiments", "0") == 0
    sigma = journal(noisy)["sigma"]
    assert len(rows(noisy)) == 3 and sigma
    fake.replies += [edit("clear gain", (BASE_LINE, "TRUE_BPB = 0.995000"))]
    capsys.readouterr()
    assert run("--max-experiments", "1") == 0
    out = capsys.readouterr().out
    assert f"noise floor sigma = {sigma}" in next(line for line in out.splitlines() if line.startswith("run t on"))
    assert [x["description"] for x in rows(noisy)][3:] == ["clear gain"]  # no new noise runs


def test_a_changed_metric_stops_the_run(noisy, fake):
    fake.replies += [edit("sneaky", (MODE_LINE, 'MODE = "touch_data"'), (BASE_LINE, "TRUE_BPB = 0.900000"))]
    with pytest.raises(SystemExit) as stop:
        run("--max-experiments", "2")
    assert "prepare.py or the prepared validation data changed" in str(stop.value)
    r = rows(noisy)  # nothing from the other metric was recorded: the run that changed it is a refused crash
    assert len(r) == 4 and r[3]["status"] == "crash" and "refused: train.py changed prepare.py" in r[3]["description"]
    assert branch_log(noisy)[0] == "noisy stand-in"
    with pytest.raises(SystemExit) as again:  # and the run cannot be resumed on the changed metric
        run("--max-experiments", "2")
    assert "changed since run t started" in str(again.value)


def test_a_train_py_that_rewrites_the_shared_prepare_py_is_recorded_and_the_tag_resumes(noisy, fake):
    """Without the sandbox it could: it is recorded as a refused crash before the night stops, so
    after `git checkout prepare.py` the same tag resumes with the next idea, not the same run."""
    fake.replies += [edit("sneaky", (MODE_LINE, 'MODE = "touch_main_prepare"'), (BASE_LINE, "TRUE_BPB = 0.900000")),
                     edit("honest", (BASE_LINE, "TRUE_BPB = 0.990000"))]
    with pytest.raises(SystemExit) as stop:
        run("--max-experiments", "2")
    assert "prepare.py or the prepared validation data changed" in str(stop.value)
    assert "changed by train.py" in (noisy / "prepare.py").read_text()
    assert [x["status"] for x in rows(noisy)][3:] == ["crash"]
    git(noisy, "checkout", "prepare.py")
    assert run("--max-experiments", "2") == 0
    r = rows(noisy)[3:]
    assert [(x["description"].split(" [")[0], x["status"]) for x in r][:2] == [("sneaky", "crash"), ("honest", "keep")]
    assert "changed by train.py" not in (noisy / "prepare.py").read_text()


def test_a_train_py_that_changes_its_own_prepare_py_is_refused(noisy, fake):
    """Its worktree's prepare.py, not the shared one: the run is refused, the night goes on."""
    fake.replies += [edit("sneaky", (MODE_LINE, 'MODE = "touch_prepare"'), (BASE_LINE, "TRUE_BPB = 0.900000"))]
    assert run("--max-experiments", "1", "--fix-attempts", "0") == 0
    r = rows(noisy)[3:]
    assert r[0]["status"] == "crash" and "refused: train.py changed prepare.py, the metric" in r[0]["description"]
    assert branch_log(noisy)[0] == "noisy stand-in"


def night_of_ideas(n_ideas, seed=0):
    """Scripted LLM for a simulated night: each idea moves the true val_bpb of the current best
    train.py by a drawn effect (half worse, a third neutral, the rest real gains of 0.5-3 sigma)
    and sets a fresh DATA_ORDER (so every file differs and neutral ideas reshuffle the noise)."""
    rng = random.Random(seed)
    ideas = {}

    def reply(request):
        train_py = request["messages"][0]["content"][0]["text"]
        true_bpb = float(re.search(r"TRUE_BPB = ([\d.]+)", train_py)[1])
        order = re.search(r"DATA_ORDER = (\d+)", train_py)[1]
        u = rng.random()
        effect = 0.001 * (rng.uniform(0.5, 4) if u < 0.5 else 0.0 if u < 0.85 else -rng.uniform(0.5, 3))
        name = f"idea {len(ideas) + 1}"
        ideas[name] = (true_bpb, round(true_bpb + effect, 6))
        return edit(name, (f"TRUE_BPB = {true_bpb:.6f}", f"TRUE_BPB = {true_bpb + effect:.6f}"),
                    (f"DATA_ORDER = {order}", f"DATA_ORDER = {len(ideas) + 1000}"))
    return [reply] * n_ideas, ideas


def train_in_process(repo, log_path, seed, timeout_s, settings, pid_file, pass_env=(), sandbox=None, cache_dir=None,
                     extra_env=None, readable=(), **scoring):
    """The stand-in train.py's formula without its subprocess (for speed): same val_bpb."""
    source = (repo / "train.py").read_text()
    true_bpb, noise_std, order = (float(re.search(rf"^{name} = ([\d.]+)", source, re.M)[1])
                                  for name in ("TRUE_BPB", "NOISE_STD", "DATA_ORDER"))
    val_bpb = float(f"{true_bpb + noise_std * random.Random(f'{seed}:{order:.0f}').gauss(0, 1):.6f}")
    log_path.write_text(f"---\nval_bpb: {val_bpb:.6f}\nseed: {seed}\n")
    return training.RunResult(val_bpb, 2048.0, 1.0, "")


@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "noise-aware"])
def test_simulated_night_of_100_experiments(noisy, fake, greedy, capsys, monkeypatch):
    """The whole driver (fake LLM, git, journal, results.tsv) for 100 experiments, with the
    training run computed in-process. A false keep is a kept idea whose true val_bpb is not
    lower than the best's. The figures are printed (pytest -s shows them)."""
    monkeypatch.setattr(training, "run_training", train_in_process)
    replies, ideas = night_of_ideas(100)
    fake.replies += replies
    assert run("--max-experiments", "100", *(["--greedy"] if greedy else [])) == 0
    r = rows(noisy)
    kept = [x for x in r if x["status"] == "keep" and x["description"].split(" [")[0] in ideas]
    false_keeps = [x for x in kept if ideas[x["description"].split(" [")[0]][1] >=
                   ideas[x["description"].split(" [")[0]][0]]
    st = json.loads((noisy / "runs/t/journal.json").read_text())
    noise_share = st["run_counts"]["noise"] / st["run_counts"]["total"]
    final_true = float(re.search(r"TRUE_BPB = ([\d.]+)", (noisy / "train.py").read_text())[1])
    with capsys.disabled():
        print(f"\n{'greedy' if greedy else 'noise-aware'}: {len(kept)} kept, {len(false_keeps)} false keeps "
              f"({len(false_keeps) / max(len(kept), 1):.0%}), {len(r)} runs, noise handling "
              f"{noise_share:.0%} of runs, true val_bpb 1.000000 -> {final_true:.6f}")
    if greedy:
        assert len(false_keeps) / len(kept) > 0.3
    else:
        assert len(false_keeps) / max(len(kept), 1) <= 0.15 and len(kept) >= 2
        assert noise_share <= 0.26


def test_decide_rules():
    """The rule on numbers: sigma 0.001, best mean 1.0 over 3 runs, so one-run margin 0.00231."""
    best = [0.999, 1.0, 1.001]
    assert decisions.decide([0.997], best, 0.001, False) == ("keep", "")                      # clearly better
    assert decisions.decide([0.9996], best, 0.001, False) == ("discard", "")                  # within 0.5 sigma
    assert decisions.decide([0.999], best, 0.001, False)[0] == "repeat"                       # marginal
    assert decisions.decide([0.999], [0.998], 0.001, False)[0] == "discard"                   # not better
    assert decisions.decide([0.999, 0.998], [0.9995], 0.001, False)[0] == "repeat_best"      # best has fewer runs
    action, note = decisions.decide([0.999, 0.9985], best, 0.001, False)
    assert action == "repeat" and note.startswith("not confirmed")
    action, note = decisions.decide([0.999, 0.998, 0.9975], best, 0.001, False)
    assert action == "keep" and note.startswith("confirmed: mean 0.998167 over 3 seeds")  # 0.001833 > 0.001633
    assert decisions.decide([0.999, 0.999, 0.999], best, 0.001, False)[0] == "discard"        # out of repeats
    assert decisions.decide([0.999], best, 0.001, False, "noise budget spent") == (
        "discard", "not confirmed: mean 0.999000 over 1 seeds vs best 1.000000, margin 0.002309 (noise budget spent)")
    assert decisions.decide([0.9999], best, 0.001, True) == ("keep", "")                      # greedy
    assert decisions.decide([0.9999], best, None, False) == ("keep", "")                      # no noise floor yet
    assert decisions.pooled_std([[1.0, 1.002], [2.0], [3.0, 3.0, 3.003]]) == pytest.approx(
        ((0.002 ** 2 / 2 + 0.003 ** 2 * 2 / 3) / 3) ** 0.5)


def test_noise_budget():
    assert decisions.budget_allows({"total": 10, "noise": 6})        # 7 <= 0.2 * 11 + 5
    assert not decisions.budget_allows({"total": 10, "noise": 7})
    assert decisions.budget_allows({"total": 100, "noise": 24}) and not decisions.budget_allows({"total": 100, "noise": 25})
