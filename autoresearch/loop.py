"""The loop: propose -> run -> decide -> record, as a pipeline.

Each slot (a GPU, or a Ray task) trains one run at a time while the LLM is already asked for the
next idea, so a slot that frees up starts again within seconds; `--pipeline off` asks only when
a slot waits (one slot then behaves exactly like the sequential driver). The main thread is the
only writer of git, the journal and results.tsv; slots and the proposer report to it through
one event queue. Every step is resumable: experiments in flight live in the journal, runs are
recorded when they end, so a driver killed at any instant resumes with nothing lost or doubled
(runs that were in flight are run again).
"""

import queue
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from autoresearch import decisions, edits, proposals, records, slots, training
from autoresearch.records import Best, Experiment, Final, Run, git

FIX_ATTEMPTS = 2                   # times a crashed run goes back to the LLM for a fix
NOISE_RUNS = 3                     # runs of the baseline (different seeds) to measure the noise floor
BASE_SEED = 42                     # seed of every first run; repeats take BASE_SEED+1, +2, ...
LOG_TAIL_LINES = 60                # log lines sent to the LLM after a crash


@dataclass
class Context:
    """What stays the same for the whole session of a driver."""
    repo: Path
    run_dir: Path
    tag: str
    model: str
    client: object
    prepare: object                # the repo's prepare module (for the metric's files)
    greedy: bool
    noise_runs: int
    fix_attempts: int
    timeout_s: float
    pass_env: tuple
    sandbox: object                # sandbox.Sandbox: bubblewrap around every training run, or off
    max_experiments: int | None
    deadline: float | None
    max_cost: float
    slots: list                    # slots.Slot: one per GPU (or Ray)
    lookahead: int                 # proposals kept ready while slots train (0: --pipeline off)

    @property
    def tsv(self):
        return self.repo / "results.tsv"

    @property
    def journal(self):
        return self.run_dir / "journal.json"

    @property
    def price_known(self):
        from autoresearch import llm
        return llm.model_price(self.model) is not None


def run_night(ctx, night):
    """Experiments until a stop condition: the baseline first, then the LLM's ideas."""
    restore_best(ctx, night)  # after a kill: branch and train.py back to the best
    slots.end_stale_runs(ctx.slots)
    events, asking, clock = queue.Queue(), {}, time.time()
    try:
        while True:
            for p in list(night.in_flight):  # decided (also: decided before a kill, not yet recorded)
                step = next_step(ctx, night, p)
                if step[0] == "record":
                    record(ctx, night, p, *step[1:])
            start_runs(ctx, night, events)
            ask(ctx, night, events, asking)  # while the slots train
            busy = start_runs(ctx, night, events)  # (the baseline ask() may have just created)
            if not busy and not asking:
                reason = stop_reason(ctx, night) or "nothing left to do"
                print(f"stopping: {reason}")
                return
            kind, key, value = events.get()
            now = time.time()
            night.wall_s, clock = night.wall_s + now - clock, now
            if kind == "error":
                raise value
            if kind == "run":
                finish_run(ctx, night, key, value)
            else:
                answered(ctx, night, asking.pop(key), value)
    finally:
        for slot in ctx.slots:  # end what still trains (Ctrl-C, SIGTERM, an error): never an orphan on the GPU
            training.kill_stale_training(slot.pid_file)


def save_state(ctx, night):
    records.save_night(ctx.journal, night)


def stop_reason(ctx, night):
    """Why no new idea is asked for now ("" when one may)."""
    done = night.next_n - 1
    if ctx.max_experiments is not None and done >= ctx.max_experiments:
        return f"{done} experiments done (--max-experiments)"
    if deadline_near(ctx, night):
        return "the deadline comes before another run could finish"
    if ctx.max_cost and night.spend["usd"] >= ctx.max_cost:
        return f"spend ${night.spend['usd']:.2f} reached --max-cost"
    return ""


def deadline_near(ctx, night):
    typical_run_s = night.gpu_s["total"] / max(night.run_counts["total"], 1)
    return bool(ctx.deadline) and time.time() + typical_run_s >= ctx.deadline


# ---------------------------------------------------------------------------
# 1. Propose: the baseline, the LLM's ideas (ahead of time) and fixes
# ---------------------------------------------------------------------------

def ask(ctx, night, events, asking):
    """Start the next LLM request if the proposer is idle: a fix a crashed run waits for, or a new
    idea while fewer than `lookahead` wait to start (with --pipeline off: only when a slot would
    otherwise wait and nothing else is in flight)."""
    if asking:
        return
    for p in night.in_flight:
        failed = next_step(ctx, night, p)
        if failed[0] == "fix":
            return submit(ctx, night, events, asking, fix_ask(ctx, night, p, failed[1]))
    if not night.best_vals and not night.in_flight:  # the baseline: the committed train.py, no LLM
        night.in_flight.append(Experiment(night.next_n, "baseline", "baseline", str(exp_dir(ctx, night.next_n)),
                                          str(ctx.repo / "train.py"), night.best.commit, 0, parent=night.best.commit))
        night.next_n += 1
        save_state(ctx, night)
        if not ctx.lookahead:
            return
    waiting = sum(p.kind == "candidate" and not p.runs and not running(ctx, p) for p in night.in_flight)
    wanted = ctx.lookahead if ctx.lookahead else (0 if night.in_flight else 1)  # --pipeline off: one at a time
    if waiting < wanted and not stop_reason(ctx, night):
        n = night.next_n  # counted once answered, so a kill while asking re-asks under the same n
        best_py = records.train_py_at(ctx.repo, night.best.commit)
        submit(ctx, night, events, asking, proposals.Ask(
            n, "idea", exp_dir(ctx, n), best_py, best_py,
            prompt_history(night, ctx), [], exp_dir(ctx, n) / "conversation.json", frozenset(night.tried)))


def exp_dir(ctx, n):
    path = ctx.run_dir / f"{n:04d}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def prompt_history(night, ctx):
    from autoresearch.prompt import history_text
    return history_text(night, ctx.greedy) + proposals.in_flight_text(night)


def submit(ctx, night, events, asking, request):
    asking[request.n] = (request, night.best.commit, night.best.description)
    settings = dict(night.settings)
    slots.in_thread(events, "answer", request.n, lambda: proposals.propose(ctx, settings, request))


def fix_ask(ctx, night, p, failed):
    """A request for a fix: the failed run's log tail back to the model, in the attempt's conversation."""
    path = conversation_path(p, p.attempt)
    messages = records.load_json(path if path.exists() else Path(p.dir) / "conversation.json")  # (older drivers)
    last_tool = next(b["id"] for b in reversed(messages[-1]["content"]) if b["type"] == "tool_use")
    tail = "\n".join(Path(failed.log).read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:])
    messages.append({"role": "user", "content": [{
        "type": "tool_result", "tool_use_id": last_tool, "is_error": True,
        "content": f"The run failed: {failed.failure}.\n\nLast lines of its log:\n{tail}"
                   "\n\nFix train.py with another edit (edits apply to the file as you left it)."}]})
    if p.commit:
        keep_discarded(ctx, f"{p.n:04d}-{p.attempt + 1}", p.commit)
    return proposals.Ask(p.n, "fix", Path(p.dir), Path(p.source).read_text(),
                         records.train_py_at(ctx.repo, night.best.commit), prompt_history(night, ctx), messages,
                         conversation_path(p, p.attempt + 1), frozenset(night.tried))


def conversation_path(p, attempt):
    """Each attempt's conversation in a file of its own: a kill before a fix is recorded re-asks
    from the attempt's own conversation, never from one that holds the unrecorded fix."""
    return Path(p.dir) / ("conversation.json" if attempt == 0 else f"conversation-{attempt + 1}.json")


def answered(ctx, night, asked, answer):
    """An answer from the proposer: a new experiment, a fix as the next attempt, or nothing valid."""
    request, parent, parent_description = asked
    proposals.add_spend(ctx, night, request.exp_dir, answer.usages)
    p = next((p for p in night.in_flight if p.n == request.n), None)
    night.next_n = max(night.next_n, request.n + 1)
    if answer.source is not None:
        night.tried.append(records.sha256_bytes(answer.source.encode()))
    if request.kind == "idea" and answer.source is None:
        print(f"{request.n:4d}  no valid edit after {proposals.EDIT_ATTEMPTS} tries; asking for a new idea", flush=True)
    elif request.kind == "idea":
        (request.exp_dir / "candidate.py").write_text(answer.source)
        (request.exp_dir / "diff.patch").write_text(edits.unified_diff(request.source, answer.source))
        night.in_flight.append(Experiment(request.n, "candidate", answer.description, str(request.exp_dir),
                                          str(request.exp_dir / "candidate.py"), None, int(time.time()),
                                          parent=parent, parent_description=parent_description,
                                          edits=[answer.edits]))
    elif answer.source is None:  # no valid fix: the experiment is recorded as a crash
        save_state(ctx, night)
        return record(ctx, night, p, "crash", "")
    else:
        p.attempt += 1
        p.fix_description = answer.description
        p.source = str(Path(p.dir) / f"candidate-{p.attempt + 1}.py")
        Path(p.source).write_text(answer.source)
        p.edits.append(answer.edits)
        p.commit, p.commit_date = None, int(time.time())
    save_state(ctx, night)


# ---------------------------------------------------------------------------
# 2. Run: every free slot takes the next run any experiment needs
# ---------------------------------------------------------------------------

def running(ctx, p):
    """The slots training a run of this experiment now."""
    return [s for s in ctx.slots if s.job and s.job[0] == p.n]


def start_runs(ctx, night, events):
    """Give each free slot a run; returns the slots that are training."""
    for slot in ctx.slots:
        if slot.job or deadline_near(ctx, night):
            continue
        for p in list(night.in_flight):
            step = next_step(ctx, night, p)
            if step[0] == "run":
                start_run(ctx, night, events, slot, p, *step[1:])
                break
    return [s for s in ctx.slots if s.job]


def start_run(ctx, night, events, slot, p, role, seed):
    """Commit the candidate if it is not yet, then train once on the slot."""
    if p.kind == "candidate" and p.parent != night.best.commit and not p.runs:
        if not rebase(ctx, night, p):  # proposed against an older best: its edits, on the new one
            return
    if role != "best" and not p.commit:
        message = p.description + (f" (fix: {p.fix_description})" if p.fix_description else "")
        p.commit = slots.commit_candidate(ctx.repo, p.parent, Path(p.source).read_text(),
                                          f"{message}\n\nautoresearch {ctx.tag} experiment {p.n}", p.commit_date)
        save_state(ctx, night)
    commit = p.parent if role == "best" else p.commit
    k = len(p.runs) + len(running(ctx, p))
    log_path = Path(p.dir) / ("train.log" if k == 0 else f"train-{k + 1}.log")
    if seed != BASE_SEED:
        night.next_seed = max(night.next_seed, seed)
    slots.start(slot, ctx, night, (p.n, role, seed, commit, log_path), events)


def rebase(ctx, night, p):
    """Re-apply a proposal's edits to the best that moved before it started; drop it (the LLM is
    asked again) when they no longer apply."""
    source = proposals.reapply(records.train_py_at(ctx.repo, night.best.commit), p.edits)
    if source is None:
        print(f"{p.n:4d}  {p.description[:60]}: its edits no longer apply to the new best; asking again", flush=True)
        night.in_flight.remove(p)
    else:
        p.parent, p.parent_description = night.best.commit, night.best.description
        p.source = str(Path(p.dir) / f"rebased-{len(p.rebased_attempts) + p.attempt + 1}.py")
        Path(p.source).write_text(source)
    save_state(ctx, night)
    return source is not None


def finish_run(ctx, night, slot, result):
    """A slot's run ended: check what it may have touched, then record the run."""
    n, role, seed, commit, log_path = slot.job
    slot.job = None
    p = next(p for p in night.in_flight if p.n == n)
    tampered = undo_tampering(ctx, night, slot, commit)
    check_metric_unchanged(ctx, night, slot)
    if tampered:
        print(f"  run refused: {tampered}", flush=True)
        result = training.RunResult(None, 0.0, result.seconds, f"refused: {tampered}")
    p.runs.append(Run(role, seed, commit, p.attempt, result.val_bpb, result.peak_vram_mb, result.seconds,
                      result.failure, str(log_path)))
    if role == "best" and result.val_bpb is not None:  # the incumbent's mean sharpens with repeats
        night.groups.setdefault(p.parent, []).append(result.val_bpb)
    night.gpu_s["total"] += result.seconds
    night.run_counts["total"] += 1
    night.slot_seconds[slot.name] = night.slot_seconds.get(slot.name, 0.0) + result.seconds
    if role != "candidate" or len(attempt_runs(p)) > 1:
        night.gpu_s["noise"] += result.seconds
        night.run_counts["noise"] += 1
    save_state(ctx, night)


def check_metric_unchanged(ctx, night, slot):
    """Numbers from a different metric are never compared or recorded: a changed prepare.py or
    prepared validation data (shared by every run) stops the run."""
    if metric_hashes(ctx.repo, ctx.prepare) != night.metric_hashes:
        restore_best(ctx, night)
        raise SystemExit("autoresearch: prepare.py or the prepared validation data changed during "
                         f"a run on {slot.name}; results would not be comparable. Restore them (or "
                         "re-run `python prepare.py`) and start a new run with another --tag.")


def undo_tampering(ctx, night, slot, commit):
    """What train.py did to the driver's records (results.tsv, git's HEAD in the user's checkout
    and in the slot's worktree), undone; "" if nothing."""
    problems = []
    moved_from = records.on_branch(ctx.repo, night.branch)
    if moved_from:
        problems.append(f"train.py moved git's HEAD to {moved_from.removeprefix('refs/heads/')}")
    if git(ctx.repo, "rev-parse", "HEAD") != night.best.commit:
        problems.append("train.py moved the driver's branch")
        git(ctx.repo, "reset", "-q", "--soft", night.best.commit)
    if (slot.worktree / ".git").exists():
        problems.append(slots.worktree_moved(slot, commit))
        if records.sha256_file(slot.worktree / "prepare.py") != night.metric_hashes["prepare.py"]:
            problems.append("train.py changed prepare.py, the metric, in its worktree")
    note = records.sync_tsv(ctx.tsv, night.rows, ctx.run_dir, strict=True)
    if note:
        problems.append(f"train.py wrote to results.tsv ({note})")
    return "; ".join(p for p in problems if p)


def metric_hashes(where, prepare):
    """Hashes of prepare.py (the one the run used) and every prepared file the metric reads."""
    return {"prepare.py": records.sha256_file(Path(where) / "prepare.py"),
            **{str(f): records.sha256_file(f) for f in prepare.metric_files()}}


# ---------------------------------------------------------------------------
# 3. Decide: what an experiment needs next (decisions.decide on its parent's runs)
# ---------------------------------------------------------------------------

def attempt_runs(p, roles=("candidate",)):
    """The experiment's runs of the current attempt's code (a fix after a crash is a new attempt)."""
    return [r for r in p.runs if r.role in roles and r.attempt == p.attempt]


def measured(runs):
    """val_bpb of the runs that produced one."""
    return [r.val_bpb for r in runs if r.val_bpb is not None]


def next_step(ctx, night, p):
    """("run", role, seed), ("fix", failed run), ("record", status, note) or ("wait",). A keep on a
    parent that is no longer the best re-bases the experiment (see stale_keep)."""
    if p.final:
        return ("record", p.final.status, p.final.note)
    if running(ctx, p) and p.kind != "baseline":
        return ("wait",)
    cand = attempt_runs(p, ("candidate", "noise"))
    if p.kind == "candidate" and not night.best_vals:
        return ("wait",)  # ideas start once the baseline is measured
    if not cand:
        return ("wait",) if running(ctx, p) else ("run", "candidate", BASE_SEED)
    if cand[0].val_bpb is None:  # the attempt's first run failed
        if p.kind == "baseline" or p.attempt >= ctx.fix_attempts:
            return ("record", "crash", "")
        return ("fix", cand[0])
    if p.kind == "baseline":  # its noise runs may train side by side on free slots
        if len(cand) + len(running(ctx, p)) < ctx.noise_runs:
            return ("run", "noise", next_seed(night))
        return ("wait",) if running(ctx, p) else ("record", "keep", "")
    vals = measured(attempt_runs(p))
    repeats = attempt_runs(p)[1:]
    no_repeat = "a repeat crashed" if any(r.val_bpb is None for r in repeats) else \
        "" if decisions.budget_allows(night.run_counts) else "noise budget spent"
    action, note = decisions.decide(vals, night.groups.get(p.parent, []), night.sigma, ctx.greedy, no_repeat)
    if action == "repeat":
        return ("run", "candidate", next_seed(night))
    if action == "repeat_best":
        return ("run", "best", next_seed(night))
    if action == "keep" and p.parent != night.best.commit:
        return stale_keep(ctx, night, p)
    if note and len(vals) > 1 and len(set(vals)) == 1:
        action, note = "discard", "refused: identical val_bpb on different seeds (train.py ignores AUTORESEARCH_SEED)"
    return ("record", action, note)


def next_seed(night):
    """A seed no run has used (taken for good only once a run starts with it)."""
    return night.next_seed + 1


def stale_keep(ctx, night, p):
    """It beats its parent, but the parent is no longer the best: never kept on a stale base. Its
    edits go on the new best and it runs again as the same experiment."""
    source = proposals.reapply(records.train_py_at(ctx.repo, night.best.commit), p.edits)
    if source is None:
        return ("record", "discard", "beat its parent, but its edits do not apply to the new best")
    p.rebased_attempts.append(p.attempt)
    p.attempt += 1
    p.parent, p.parent_description = night.best.commit, night.best.description
    p.source = str(Path(p.dir) / f"rebased-{len(p.rebased_attempts)}.py")
    Path(p.source).write_text(source)
    p.commit, p.commit_date = None, int(time.time())
    save_state(ctx, night)
    return ("run", "candidate", BASE_SEED)


# ---------------------------------------------------------------------------
# 4. Record: the rows, the best, the noise floor, the branch
# ---------------------------------------------------------------------------

def experiment_rows(ctx, night, p, status, note):
    """results.tsv lines for every run of the experiment, each description saying what it was."""
    description = p.description + (f" (fixed after a crash: {p.fix_description})" if p.fix_description else "")
    lines, runs_in_group = [], {}
    for r in p.runs:
        group = (r.role, r.attempt)
        i = runs_in_group[group] = runs_in_group.get(group, 0) + 1  # run number within its group
        failed = r.val_bpb is None
        crash = f" [crash: {r.failure}]" if failed else ""
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
                text += " [beat its parent, which was no longer the best: re-run on the new best]"
            elif note and not failed and r.attempt == p.attempt:
                text += f" [{note}]"
            row_status = status if r.attempt == p.attempt or failed else "discard"
        lines.append(records.format_row(r.commit, r.val_bpb, r.peak_vram_mb, "crash" if failed else row_status, text))
    return lines


def record(ctx, night, p, status=None, note=None):
    """Decide the rows, write them once, then move the branch; safe to repeat after a kill
    (the decision is saved first, everything after it is idempotent)."""
    if p.final is None:
        p.final = Final(status, experiment_rows(ctx, night, p, status, note), note)
        save_state(ctx, night)
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
    night.rows += final.rows
    night.in_flight.remove(p)
    night.done += 1
    save_state(ctx, night)
    restore_best(ctx, night)
    status_line(ctx, night, p, final, best_before)
    if p.kind == "baseline" and final.status == "crash":
        raise SystemExit(f"autoresearch: the baseline train.py failed: {p.runs[-1].failure}; "
                         f"see {p.runs[-1].log}. Fix train.py, commit it on {night.branch} "
                         f"and run `python driver.py --tag {ctx.tag}` again.")
    return final


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
    hours = max(night.wall_s, 1e-9) / 3600
    duty = ", ".join(f"{s.name} {night.slot_seconds.get(s.name, 0.0) / max(night.wall_s, 1e-9):.0%}"
                     for s in ctx.slots)
    return f"{night.done / hours:.1f} exp/h, duty {duty}"


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
          f"| best {short_best(night)}{sigma}, {total} | {throughput(ctx, night)}", flush=True)
