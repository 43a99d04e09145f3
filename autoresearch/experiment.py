"""An experiment's course: what it needs next (a run, a fix, a decision on its parent's runs)
and how it ends (its rows, the best, the noise floor, the branch). The loop asks next_step of
every experiment in flight and carries out the answer.
"""

import itertools
import statistics
import time
from pathlib import Path

from autoresearch import decisions, notebook, page, proposals, records, training
from autoresearch.records import Best, Final, git

BASE_SEED = 42                     # seed of every first run; repeats take BASE_SEED+1, +2, ...
AWAITING_LESSONS = 8               # finished ideas the model is asked a lesson for, at most (the latest)
MAX_REBASES = 3                    # times an idea ahead of a parent no longer the best is moved onto the new one


def save(ctx, night):
    """The journal, after every step."""
    records.save_night(ctx.journal, night)


def running(ctx, p):
    """The slots training a run of this experiment now."""
    return [s for s in ctx.slots if s.job and s.job[0] == p.n]


# ---------------------------------------------------------------------------
# What an experiment needs next (decisions.decide on its parent's runs)
# ---------------------------------------------------------------------------

def attempt_runs(p, roles=("candidate",)):
    """The experiment's runs of the current attempt's code (a fix after a crash is a new attempt)."""
    return [r for r in p.runs if r.role in roles and r.attempt == p.attempt]


def measured(runs):
    """val_bpb of the runs that produced one."""
    return [r.val_bpb for r in runs if r.val_bpb is not None]


def next_step(ctx, night, p):
    """("run", role, seed), ("fix", failed run), ("record", status, note) or ("wait",). A keep on a
    parent that is no longer the best re-bases the experiment (see stale_keep); a gain still to
    confirm is confirmed on the parent it was measured on first."""
    if p.final:
        return ("record", p.final.status, p.final.note)
    if p.kind == "baseline":
        return baseline_step(ctx, night, p)
    if running(ctx, p):
        return ("wait",)
    cand = attempt_runs(p, ("candidate", "noise"))
    if not cand:
        return ("run", "candidate", BASE_SEED)  # (also before the baseline is measured: decided after)
    if cand[0].val_bpb is None:  # the attempt's first run failed
        if p.attempt - len(p.rebased_attempts) >= ctx.fix_attempts \
                or not training.fixable(cand[0].failure):  # (rebases are no fixes)
            return ("record", "crash", "")
        return ("fix", cand[0])
    if not night.best_vals:
        return ("wait",)  # the decision needs the baseline's numbers
    runs = sorted(attempt_runs(p), key=lambda r: r.seed)  # (seeds are taken in the order runs start)
    crashed = [i for i, r in enumerate(runs) if r.val_bpb is None]
    vals = measured(runs[:crashed[0]] if crashed else runs)  # a crash ends the repeats, even those run ahead
    no_repeat = "a repeat crashed" if crashed else \
        "" if decisions.budget_allows(night.run_counts) else "noise budget spent"
    prior, parent_vals = carried(night, p), night.groups.get(p.parent, [])
    action, note = decisions.decide(prior + vals, parent_vals, night.sigma, ctx.greedy, no_repeat)
    if action == "keep" and prior and statistics.fmean(vals) >= statistics.fmean(parent_vals):
        action, note = "discard", (f"ahead on an earlier best, but not on this one (mean {statistics.fmean(vals):.6f} "
                                   f"vs {statistics.fmean(parent_vals):.6f})")
    if action == "keep" and p.parent != night.best.commit:
        return stale_keep(ctx, night, p)  # (a gain still to confirm is confirmed on its parent first)
    if action == "repeat":
        return ("run", "candidate", next_seed(night))
    if action == "repeat_best":
        return ("run", "best", next_seed(night))
    if note and len(vals) > 1 and len(set(vals)) == 1:
        return ("record", "discard", "refused: identical val_bpb on different seeds (train.py ignores AUTORESEARCH_SEED)")
    return ("record", action, note)


def baseline_step(ctx, night, p):
    """The baseline's runs, its first seed and its noise runs, side by side on free slots from the
    start; decided once none trains: kept, or a crash if any run failed (the night then stops)."""
    cand, training_now = attempt_runs(p, ("candidate", "noise")), running(ctx, p)
    if any(r.val_bpb is None for r in cand):
        return ("wait",) if training_now else ("record", "crash", "")
    if len(cand) + len(training_now) < ctx.noise_runs:
        first_taken = any(r.role == "candidate" for r in cand) or any(s.job[1] == "candidate" for s in training_now)
        return ("run", "noise", next_seed(night)) if first_taken else ("run", "candidate", BASE_SEED)
    return ("wait",) if training_now else ("record", "keep", "")


def ahead_step(ctx, night, p):
    """("run", role, seed): a further repeat of a confirmation under way (a run of it trains, the
    rule asked for more) that a free slot may take before that run ends: the candidate's, up to
    CONFIRM_RUNS runs, then its best's, up to one fewer: no more than the sequential course could
    ask for. The decision waits for every run and is the rule's on all of them. None: nothing."""
    pending = [s.job[1] for s in running(ctx, p)]
    runs = attempt_runs(p)
    if p.kind != "candidate" or p.final or not pending or p.parent != night.best.commit or not runs \
            or any(r.val_bpb is None for r in runs):
        return None
    prior = carried(night, p)
    action, _ = decisions.decide(prior + measured(runs), night.groups.get(p.parent, []), night.sigma, ctx.greedy)
    training_now = sum(bool(s.job) for s in ctx.slots)  # (every run in flight counted as a repeat)
    counts = {"noise": night.run_counts["noise"] + training_now, "total": night.run_counts["total"] + training_now}
    if action not in ("repeat", "repeat_best") or not decisions.budget_allows(counts):
        return None
    if len(prior) + len(runs) + pending.count("candidate") < decisions.CONFIRM_RUNS:
        return ("run", "candidate", next_seed(night))
    if len(night.groups.get(p.parent, [])) + pending.count("best") < decisions.CONFIRM_RUNS - 1:
        return ("run", "best", next_seed(night))
    return None


def free_log(p, training):
    """train.log, train-2.log, ...: the first name that no recorded run of the experiment and no run
    training now has (runs side by side end in any order, and a kill re-runs only some)."""
    taken = {str(r.log) for r in p.runs} | {str(path) for path in training}
    names = (Path(p.dir) / ("train.log" if k == 0 else f"train-{k + 1}.log") for k in itertools.count())
    return next(path for path in names if str(path) not in taken)


def next_seed(night):
    """A seed no run has used (taken for good only once a run starts with it)."""
    return night.next_seed + 1


def carried(night, p):
    """What the idea's runs on earlier bests say, moved onto its parent now: each run's value plus the
    difference between the parent's mean and the mean of the best it was measured on (an effect that
    adds to either code). The decision on the new parent counts them with its own runs, so a re-base
    costs one run, not a confirmation again; a keep still needs the runs on the code it is kept into
    to beat that code."""
    now, out = night.groups.get(p.parent), []
    for attempt, measured_on in p.rebased_from if now else []:
        before = night.groups.get(measured_on)
        runs = sorted((r for r in p.runs if r.attempt == attempt and r.role == "candidate"), key=lambda r: r.seed)
        crashed = [i for i, r in enumerate(runs) if r.val_bpb is None]
        vals = measured(runs[:crashed[0]] if crashed else runs)
        if before and vals:
            out += [v + statistics.fmean(now) - statistics.fmean(before) for v in vals]
    return out


def stale_keep(ctx, night, p):
    """It beats its parent (confirmed there when the margin asked for repeats), but the parent is no
    longer the best: never kept on a stale base. Its edits go on the new best and it runs again as
    the same experiment, its runs so far carried over (see carried); after MAX_REBASES it is given up."""
    if len(p.rebased_attempts) >= MAX_REBASES:
        return ("record", "discard", f"ahead of its parent, but the best moved {MAX_REBASES} times while it was "
                                     "measured; not re-run again")
    source = proposals.reapply(records.train_py_at(ctx.repo, night.best.commit), p.edits)
    if source is None:
        return ("record", "discard", "ahead of its parent, but its edits do not apply to the new best")
    keep_discarded(ctx, f"{p.n:04d}-{p.attempt + 1}", p.commit)  # the stale attempt stays readable
    conversation = conversation_path(p, p.attempt)
    p.rebased_attempts.append(p.attempt)
    p.rebased_from.append([p.attempt, p.parent])
    p.attempt += 1
    if conversation.exists():  # a fix of the re-run continues the same conversation
        conversation_path(p, p.attempt).write_text(conversation.read_text())
    p.parent, p.parent_description = night.best.commit, night.best.description
    p.source = str(Path(p.dir) / f"candidate-{p.attempt + 1}.py")
    Path(p.source).write_text(source)
    p.commit, p.commit_date = None, int(time.time())
    save(ctx, night)
    return ("run", "candidate", BASE_SEED)


def conversation_path(p, attempt):
    """Each attempt's conversation in a file of its own: a kill before a fix is recorded re-asks
    from the attempt's own conversation, never from one that holds the unrecorded fix."""
    return Path(p.dir) / ("conversation.json" if attempt == 0 else f"conversation-{attempt + 1}.json")


# ---------------------------------------------------------------------------
# How it ends: the rows, the best, the noise floor, the branch
# ---------------------------------------------------------------------------

def experiment_rows(ctx, night, p, status, note):
    """results.tsv lines for every run of the experiment, each description saying what it was."""
    description = p.description + (f" (fixed after a crash: {p.fix_description})" if p.fix_description else "")
    lines, runs_in_group = [], {}
    for r in sorted(p.runs, key=lambda r: (r.attempt, r.seed)):  # (in the order they started, not ended)
        group = (r.role, r.attempt)
        i = runs_in_group[group] = runs_in_group.get(group, 0) + 1  # run number within its group
        failed = r.val_bpb is None
        crash = f" [crash: {r.failure}" + (f"; {r.note}]" if r.note else "]") if failed else ""
        row_status = "keep"  # noise runs and repeats of the best are runs of kept code
        if r.role == "noise":
            text = f"noise run {i + 1}/{ctx.noise_runs} (seed {r.seed}): baseline{crash}"
        elif r.role == "best":
            text = f"repeat of best (seed {r.seed}): {p.parent_description or night.best.description}{crash}"
        else:
            text = (description if r.attempt == p.attempt else p.description) + crash
            if i > 1:
                text = f"repeat {i}/{decisions.CONFIRM_RUNS} (seed {r.seed}): {text}"
            elif r.attempt in p.rebased_attempts and not failed:
                text += " [ahead of its parent, which was no longer the best: re-run on the new best]"
            elif note and not failed and r.attempt == p.attempt:
                text += f" [{note}]"
            row_status = status if r.attempt == p.attempt or failed else "discard"
        if r.note and not failed:  # (a crash's failure says it already)
            text += f" [{r.note}]"
        lines.append(records.format_row(r.commit, r.val_bpb, r.peak_vram_mb, "crash" if failed else row_status, text))
    return lines


def record(ctx, night, p, status=None, note=None):
    """Decide the rows, write them once, then move the branch; safe to repeat after a kill
    (the decision is saved first, everything after it is idempotent). The night's page follows."""
    parent_vals, sigma = list(night.groups.get(p.parent) or night.best_vals), night.sigma  # (what it was judged on)
    if p.final is None:
        if status == "keep" and p.kind != "baseline" and not records.git_succeeds(
                ctx.repo, "merge-base", "--is-ancestor", night.best.commit, p.commit):
            status, note = "discard", "refused: its commit does not hold the best's code, so keeping it would drop a keep"
        p.final = Final(status, experiment_rows(ctx, night, p, status, note), note)
        save(ctx, night)
    final = p.final
    foreign = records.sync_tsv(ctx.tsv, night.rows + final.rows, ctx.run_dir)
    if foreign:
        print(f"  note: {foreign}", flush=True)
    best_before = statistics.fmean(night.best_vals) if night.best_vals else None
    vals = measured(attempt_runs(p, ("candidate", "noise")))
    if final.status == "keep":
        if p.kind != "baseline":
            night.best = Best(p.commit, p.description)
        night.groups[night.best.commit] = vals
    else:
        if p.commit and p.kind != "baseline":
            keep_discarded(ctx, f"{p.n:04d}", p.commit)
        if len(vals) > 1 and p.commit and not final.note.startswith("refused"):  # refused values are no noise
            night.groups[p.commit] = vals
    night.sigma = decisions.pooled_std(list(night.groups.values())) or night.sigma
    if "not confirmed" in final.note:
        night.wins_rejected += 1
    if p.kind == "candidate":
        remember(ctx, night, p, final.status, best_before)
    page.quietly(f"experiment {p.n}'s record for the page", page.experiment_record, ctx, night, p, final, vals,
                 parent_vals, sigma)
    night.rows += final.rows
    night.in_flight.remove(p)
    night.done += 1
    save(ctx, night)
    restore_best(ctx, night)
    status_line(ctx, night, p, final, best_before)
    page.quietly("the night's page", page.write, ctx.run_dir, ctx.tsv)
    if p.kind == "baseline" and final.status == "crash":
        night.in_flight.clear()  # ideas proposed against the broken baseline: asked again after the fix
        save(ctx, night)
        failed = next((r for r in reversed(p.runs) if r.val_bpb is None), p.runs[-1])  # (seeds end in any order)
        stopped = failed.failure.partition("before its model was scored: ")[2]
        if stopped:  # (train.py stopped itself with one line: the GPU, the settings)
            raise SystemExit(f"autoresearch: the baseline stopped: {stopped} (its log: {failed.log})")
        raise SystemExit(f"autoresearch: the baseline train.py failed: {failed.failure}; "
                         f"see {failed.log}. Fix train.py, commit it on {night.branch} "
                         f"and run `python driver.py --tag {ctx.tag}` again.")
    return final


def remember(ctx, night, p, status, best_before):
    """The notebook's line for a finished idea, its theme's count, the plateau's streak, and its
    lesson owed by the model's next request."""
    vals = measured(attempt_runs(p))
    mean = statistics.fmean(vals) if vals else None
    delta = mean - best_before if mean is not None and best_before is not None else None
    theme = p.theme or "other"
    line = notebook.entry(p, status, mean, delta)
    notebook.add_entry(ctx.run_dir / "notes.md", theme, p.n, line)
    counts = night.themes.setdefault(theme, {})
    counts[status] = counts.get(status, 0) + 1
    night.since_keep = 0 if status == "keep" else night.since_keep + 1
    night.awaiting = (night.awaiting + [[p.n, line]])[-AWAITING_LESSONS:]


def restore_best(ctx, night):
    """Branch back to the best commit and train.py from it; no other file is touched, and no
    branch but the driver's moves (HEAD is put back on it first if train.py moved it)."""
    records.on_branch(ctx.repo, night.branch)
    git(ctx.repo, "reset", "-q", "--soft", night.best.commit)
    git(ctx.repo, "checkout", "-q", night.best.commit, "--", "train.py")


def keep_discarded(ctx, name, commit):
    """A discarded attempt stays reachable (and its diff readable) under a ref."""
    git(ctx.repo, "update-ref", f"refs/autoresearch/{ctx.tag}/discarded/{name}", commit)


def short_best(night):
    vals = night.best_vals
    return f"{statistics.fmean(vals):.6f} ({night.best.commit[:7]})" if vals else "none yet"


def throughput(ctx, night):
    """Experiments per hour and each slot's duty cycle (share of wall time inside train.py)."""
    duty = ", ".join(f"{name} {share:.0%}" for name, share in night.duty_cycle([s.name for s in ctx.slots]).items())
    return f"{night.experiments_per_hour:.1f} exp/h, duty {duty}"


def status_line(ctx, night, p, final, best_before):
    """One line per experiment: number, val_bpb, delta vs best, status, cost, totals, throughput."""
    vals = measured(attempt_runs(p))
    mean = statistics.fmean(vals) if vals else None
    val = f"{mean:.6f}" if vals else "   -    "
    delta = f"{mean - best_before:+.6f}" if vals and best_before is not None else "    -    "
    sigma = f" sigma {night.sigma:.6f}" if night.sigma and not ctx.greedy else ""
    usage_file = Path(p.dir) / "usage.json"
    cost = records.load_json(usage_file)["usd"] if usage_file.exists() else 0.0
    cost_text = f"${cost:.3f}" if ctx.price_known else "$?"
    total = f"${night.spend['usd']:.2f}" if ctx.price_known else "cost unknown"
    note = f" [{final.note}]" if final.note else ""
    print(f"{p.n:4d}  {val} ({delta})  {final.status:7s} {cost_text:>7s}  {p.description[:60]}{note}  "
          f"| best {short_best(night)}{sigma}, {total} | {throughput(ctx, night)}, {night.since_keep} since a keep",
          flush=True)
