"""The loop: propose -> run -> decide -> record, as a pipeline.

Each slot (a GPU, or a Ray task) trains one run at a time while the LLM is already asked for the
next idea, so a slot that frees up starts again within seconds; `--pipeline off` asks only when
a slot waits (one slot then behaves exactly like the sequential driver). The main thread is the
only writer of git, the journal and results.tsv; slots and the proposer report to it through
one event queue. Every step is resumable: experiments in flight live in the journal, runs are
recorded when they end, so a driver killed at any instant resumes with nothing lost or doubled
(runs that were in flight are run again).
"""

import math
import queue
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from autoresearch import edits, experiment, notebook, page, prompt, proposals, records, slots, training
from autoresearch.records import Experiment, Run, git

FIX_ATTEMPTS = 2                   # times a crashed run goes back to the LLM for a fix
NOISE_RUNS = 3                     # runs of the baseline (different seeds) to measure the noise floor


@dataclass
class Context:
    """What stays the same for the whole session of a driver."""
    repo: Path
    run_dir: Path
    tag: str
    model: str
    llm: object                    # the provider: llm.AnthropicProvider or openai_api.OpenAIProvider
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
    plateau: int                   # ideas without a keep after which the model is told of a plateau
    limits: training.Limits = field(default_factory=training.Limits)  # what one run may use
    git_config: tuple = ()         # (path, bytes) of the repository's git config as the driver last saw it

    @property
    def tsv(self):
        return self.repo / "results.tsv"

    @property
    def journal(self):
        return self.run_dir / "journal.json"

    @property
    def price_known(self):
        return self.llm.price is not None


def run_night(ctx, night):
    """Experiments until a stop condition: the baseline first, then the LLM's ideas."""
    experiment.restore_best(ctx, night)  # after a kill: branch and train.py back to the best
    slots.end_runs(ctx.slots, ctx.run_dir)
    git(ctx.repo, "worktree", "prune")  # (worktrees a killed driver's clean-up did not reach)
    page.quietly("the night's page", page.write, ctx.run_dir, ctx.tsv)  # (from the start; then at every decision)
    events, asking, clock = queue.Queue(), {}, time.time()
    try:
        while True:
            for p in list(night.in_flight):  # decided (also: decided before a kill, not yet recorded)
                step = experiment.next_step(ctx, night, p)
                if step[0] == "record":
                    experiment.record(ctx, night, p, *step[1:])
            start_runs(ctx, night, events)
            ask(ctx, night, events, asking)  # while the slots train
            start_runs(ctx, night, events)  # (the baseline ask() may have just created)
            busy = run_ahead(ctx, night, events, asking)
            if not busy and not asking:
                if deadline_near(ctx, night):
                    record_unfinished(ctx, night)
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
            elif kind == "usage":
                proposals.add_spend(ctx, night, asking[key][0].exp_dir, value)
                experiment.save(ctx, night)
            else:
                answered(ctx, night, asking.pop(key), value)
    finally:
        slots.end_runs(ctx.slots, ctx.run_dir)
        slots.remove_worktrees(ctx.repo, ctx.slots)


def stop_reason(ctx, night, asking=()):
    """Why no new idea is asked for now ("" when one may); `asking`: numbers of ideas asked for."""
    done = max([night.next_n] + [n + 1 for n in asking]) - 1
    if ctx.max_experiments is not None and done >= ctx.max_experiments:
        return f"{done} experiments done (--max-experiments)"
    if deadline_near(ctx, night):
        return "the deadline comes before another run could finish"
    if ctx.max_cost and night.spend["usd"] >= ctx.max_cost:
        return f"spend ${night.spend['usd']:.2f} reached --max-cost"
    return ""


def latest_start(ctx, night):
    """The last time a run may start and still end by the deadline, as runs have taken so far (None:
    no deadline)."""
    return ctx.deadline - night.gpu_s["total"] / max(night.run_counts["total"], 1) if ctx.deadline else None


def deadline_near(ctx, night):
    latest = latest_start(ctx, night)
    return latest is not None and time.time() >= latest


# ---------------------------------------------------------------------------
# 1. Propose: the baseline, the LLM's ideas (ahead of time) and fixes
# ---------------------------------------------------------------------------

def ask(ctx, night, events, asking):
    """Start LLM requests, up to one per slot at a time (one with --pipeline off): fixes that crashed
    runs wait for, the notebook condensed when it grew too long, then new ideas while fewer than
    `lookahead` wait to start (with --pipeline off: only when nothing else is in flight)."""
    most = max(1, ctx.lookahead)
    for p in night.in_flight:
        failed = experiment.next_step(ctx, night, p)
        if failed[0] == "fix" and p.n not in asking and len(asking) < most:
            submit(ctx, night, events, asking, fix_ask(ctx, night, p, failed[1]))
    if notebook.too_long(ctx.run_dir / "notes.md", night.condensed_chars) and CONDENSE not in asking \
            and len(asking) < most and not stop_reason(ctx, night):
        text = notebook.read(ctx.run_dir / "notes.md")  # the snapshot the model condenses (the Ask's source)
        submit(ctx, night, events, asking, proposals.Ask(CONDENSE, "condense", ctx.run_dir, text,
                                                         *prompt.condense_request(text, notebook.NOTES_MAX_CHARS),
                                                         [], ctx.run_dir / "condense.json", frozenset()))
    if not night.best_vals and not night.in_flight:  # the baseline: the committed train.py, no LLM
        night.in_flight.append(Experiment(night.next_n, "baseline", "baseline", str(exp_dir(ctx, night.next_n)),
                                          str(ctx.repo / "train.py"), night.best.commit, 0, parent=night.best.commit))
        night.next_n += 1
        experiment.save(ctx, night)
    ideas = [n for n, (request, *_) in asking.items() if request.kind == "idea"]
    waiting = sum(p.kind == "candidate" and not p.runs and not experiment.running(ctx, p) for p in night.in_flight)
    wanted = ctx.lookahead if ctx.lookahead else (0 if night.in_flight or asking else 1)  # off: one at a time
    while waiting + len(ideas) < wanted and len(asking) < most and not stop_reason(ctx, night, ideas):
        n = max([night.next_n] + [i + 1 for i in ideas])  # counted once answered: a kill re-asks under it
        best_py = records.train_py_at(ctx.repo, night.best.commit)
        submit(ctx, night, events, asking, proposals.Ask(
            n, "idea", exp_dir(ctx, n), best_py, *request_parts(ctx, night, best_py), [],
            exp_dir(ctx, n) / "conversation.json", frozenset(night.tried)))
        ideas.append(n)


CONDENSE = -1                      # the key of a request to condense the notebook


def exp_dir(ctx, n):
    path = ctx.run_dir / f"{n:04d}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def request_parts(ctx, night, shown):
    """(system, user) of a request that shows `shown` as train.py: program.md read afresh, the
    notebook, the history and what is in flight, the lessons owed and a plateau, if there is one."""
    program = ctx.repo / "program.md"
    guidance = ""
    if night.awaiting:
        guidance += ("Give a one-line lesson (in `lessons`) for each of these finished experiments, what its "
                     "result says:\n" + "\n".join(f"{line}" for _, line in night.awaiting) + "\n\n")
    if 0 < ctx.plateau <= night.since_keep:
        tried = sorted(night.themes.items(), key=lambda kv: -sum(kv[1].values()))[:3]
        themes = ", ".join(f"{theme} ({sum(c.values())} tried, {c.get('keep', 0)} kept)" for theme, c in tried)
        guidance += (f"Plateau: no change has been kept in the last {night.since_keep} experiments. The themes "
                     f"tried most: {themes}. Propose a different kind of change, not another variation of these.\n\n")
    return prompt.build(ctx.repo, night.settings, program.read_text() if program.exists() else "(no program.md)",
                        shown, notebook.read(ctx.run_dir / "notes.md"),
                        prompt.history_text(night, ctx.greedy) + proposals.in_flight_text(night), guidance)


def submit(ctx, night, events, asking, request):
    asking[request.n] = (request, night.best.commit, night.best.description)
    on_reply = lambda counts: events.put(("usage", request.n, counts))  # noqa: E731  (paid: counted at once)
    work = proposals.condense if request.kind == "condense" else proposals.propose
    slots.in_thread(events, "answer", request.n, lambda: work(ctx, request, on_reply))


def fix_ask(ctx, night, p, failed):
    """A request for a fix: the failed run's log tail back to the model, in the attempt's conversation."""
    path = experiment.conversation_path(p, p.attempt)
    messages = records.load_json(path if path.exists() else Path(p.dir) / "conversation.json")  # (older drivers)
    tail = prompt.log_tail(failed.log) if Path(failed.log).exists() else "(no log)"
    failure = prompt.mask_secrets(failed.failure[:prompt.LOG_TAIL_CHARS])
    messages = ctx.llm.feedback(messages, f"The run failed: {failure}.\n\nLast lines of its log:\n{tail}\n\n"
                                          "Fix train.py with another edit (edits apply to the file as you left it).")
    if p.commit:
        experiment.keep_discarded(ctx, f"{p.n:04d}-{p.attempt + 1}", p.commit)
    shown = records.train_py_at(ctx.repo, p.parent)
    return proposals.Ask(p.n, "fix", Path(p.dir), Path(p.source).read_text(), *request_parts(ctx, night, shown),
                         messages, experiment.conversation_path(p, p.attempt + 1), frozenset(night.tried))


def answered(ctx, night, asked, answer):
    """An answer from the proposer: a new experiment, a fix as the next attempt, nothing valid, or a
    condensed notebook; and the lessons it gave for finished experiments."""
    request, parent, parent_description = asked
    if request.kind == "condense":
        if answer.text.strip():
            notebook.replace(ctx.run_dir / "notes.md", answer.text, request.source, ctx.run_dir)
        night.condensed_chars = len(notebook.read(ctx.run_dir / "notes.md"))
        experiment.save(ctx, night)
        return
    learned = False
    for lesson in answer.lessons:
        n = str(lesson.get("experiment", "")).lstrip("#")
        owed = [a for a in night.awaiting if n.isdigit() and a[0] == int(n)]
        text = proposals.one_line(lesson.get("lesson"))
        if owed and text and notebook.add_lesson(ctx.run_dir / "notes.md", owed[0][0], text):
            night.awaiting.remove(owed[0])
            page.quietly("a lesson on the page", page.add_lesson, exp_dir(ctx, owed[0][0]), text)
            learned = True
    if learned:
        page.quietly("the night's page", page.write, ctx.run_dir, ctx.tsv)
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
                                          edits=[answer.edits], hypothesis=answer.hypothesis, theme=answer.theme))
    elif answer.source is None:  # no valid fix: the experiment is recorded as a crash
        experiment.save(ctx, night)
        return experiment.record(ctx, night, p, "crash", "")
    else:
        p.attempt += 1
        p.fix_description = answer.description
        p.source = str(Path(p.dir) / f"candidate-{p.attempt + 1}.py")
        Path(p.source).write_text(answer.source)
        p.edits.append(answer.edits)
        p.commit, p.commit_date = None, int(time.time())
    experiment.save(ctx, night)


# ---------------------------------------------------------------------------
# 2. Run: every free slot takes the next run any experiment needs
# ---------------------------------------------------------------------------

def start_runs(ctx, night, events):
    """Give each free slot a run (none that could not end by the deadline, whatever it is for);
    returns the slots that are training."""
    def next_run(p):
        step = experiment.next_step(ctx, night, p)
        return step if step[0] == "run" else None
    free = [] if deadline_near(ctx, night) else [s for s in ctx.slots if not s.job]
    return fill(ctx, night, events, free, next_run)


def run_ahead(ctx, night, events, asking):
    """Slots that nothing needs now (no experiment's next run, no idea or fix on its way) run ahead
    the further repeats a confirmation under way may still ask for, side by side with its pending
    run, so the last ideas of a night are confirmed in one run's time, not three (never past the
    deadline). Returns the slots that are training."""
    on_the_way = sum(request.kind in ("idea", "fix") for request, *_ in asking.values())
    free = [] if deadline_near(ctx, night) else [s for s in ctx.slots if not s.job][on_the_way:]
    return fill(ctx, night, events, free, lambda p: experiment.ahead_step(ctx, night, p))


def record_unfinished(ctx, night):
    """At the deadline: an idea whose runs began but whose decision needs runs that could not end
    in time is recorded as such (a confirmation cut short is no keep); one that never ran waits in
    the journal for a resume."""
    for p in list(night.in_flight):
        if p.kind != "candidate" or not p.runs or p.final or experiment.next_step(ctx, night, p)[0] != "run":
            continue
        if any(r.val_bpb is not None for r in p.runs):
            experiment.record(ctx, night, p, "discard", "unconfirmed: the deadline came before the runs it needed")
        else:  # (every run so far crashed: its fix did not run)
            experiment.record(ctx, night, p, "crash", "the deadline came before its fix could run")


def fill(ctx, night, events, free, step_for):
    """Each slot in `free` starts the first run that step_for(experiment) offers, oldest experiment
    first; returns the slots that are training."""
    for slot in free:
        for p in list(night.in_flight):
            step = step_for(p)
            if step:
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
        experiment.save(ctx, night)
    commit = p.parent if role == "best" else p.commit
    log_path = experiment.free_log(p, [s.job[4] for s in experiment.running(ctx, p)])
    if seed != experiment.BASE_SEED:
        night.next_seed = max(night.next_seed, seed)
    slots.start(slot, ctx, night, (p.n, role, seed, commit, log_path), events, check_below(ctx, night, p, role),
                fill_cache=p.kind == "baseline" and not p.runs and not experiment.running(ctx, p),
                retry_until=latest_start(ctx, night))


def check_below(ctx, night, p, role):
    """A run scoring below this is checked (scoring.check) before its score counts: every run of the
    baseline and of the best, every repeat (its value joins the noise floor), and an idea's first run
    when it beats its parent or the best: every run whose number a keep or the noise floor can use."""
    if p.kind == "baseline" or role != "candidate" or experiment.attempt_runs(p) or experiment.running(ctx, p):
        return math.inf
    means = [statistics.fmean(v) for v in (night.groups.get(p.parent), night.best_vals) if v]
    return max(means) if means else math.inf


def rebase(ctx, night, p):
    """Re-apply a proposal's edits to the best that moved before it started; drop it (the LLM is
    asked again) when they no longer apply."""
    source = proposals.reapply(records.train_py_at(ctx.repo, night.best.commit), p.edits)
    if source is None:
        print(f"{p.n:4d}  {p.description[:60]}: its edits no longer apply to the new best; asking again", flush=True)
        night.in_flight.remove(p)
    else:
        p.parent, p.parent_description = night.best.commit, night.best.description
        p.source = str(Path(p.dir) / "candidate-rebased.py")  # (before any run: nothing measured is overwritten)
        Path(p.source).write_text(source)
        p.commit, p.commit_date = None, int(time.time())  # (one made on the old best, by a run a kill cut short)
    experiment.save(ctx, night)
    return source is not None


def finish_run(ctx, night, slot, result):
    """A slot's run ended: check what it may have touched, then record the run. A changed metric
    stops the night; with the sandbox off the run may have changed it, and is recorded as refused
    first (a resumed night never runs it again)."""
    n, role, seed, commit, log_path = slot.job
    slot.job = None
    p = next(p for p in night.in_flight if p.n == n)
    tampered = undo_tampering(ctx, night, slot, commit)
    metric_changed = records.metric_hashes(ctx.repo, ctx.prepare) != night.metric_hashes
    if metric_changed and not sandboxed(ctx):
        tampered = "; ".join(filter(None, [tampered, "train.py changed prepare.py or the prepared validation data "
                                                     "(the metric)"]))
    if tampered:
        print(f"  run refused: {tampered}", flush=True)
        result = training.RunResult(None, 0.0, result.seconds, f"refused: {tampered}", result.device_batch, result.note)
    p.runs.append(Run(role, seed, commit, p.attempt, result.val_bpb, result.peak_vram_mb, result.seconds,
                      result.failure, str(log_path), result.device_batch, result.note))
    night.finished.append(dict(n=p.n, role=role, seed=seed, slot=slot.name, ended=round(time.time(), 1),
                               seconds=round(result.seconds, 1), val_bpb=result.val_bpb,
                               device_batch=result.device_batch, note=result.note))
    if role == "best" and result.val_bpb is not None:  # the incumbent's mean sharpens with repeats
        night.groups.setdefault(p.parent, []).append(result.val_bpb)
    night.gpu_s["total"] += result.seconds
    night.run_counts["total"] += 1
    night.slot_seconds[slot.name] = night.slot_seconds.get(slot.name, 0.0) + result.seconds
    if role != "candidate" or len(experiment.attempt_runs(p)) > 1:
        night.gpu_s["noise"] += result.seconds
        night.run_counts["noise"] += 1
    experiment.save(ctx, night)
    if metric_changed:
        stop_for_metric(ctx, night, slot, p)


def sandboxed(ctx):
    """Whether runs are in the sandbox, where they cannot write the user's checkout or the data."""
    return bool(ctx.sandbox and ctx.sandbox.bwrap)


def stop_for_metric(ctx, night, slot, p):
    """Numbers from a different metric are never compared or recorded: a changed prepare.py or
    prepared validation data (shared by every run) stops the night, the run that could have
    changed it recorded first as a refused crash."""
    if not sandboxed(ctx) and p in night.in_flight:
        experiment.record(ctx, night, p, "crash", "")
    experiment.restore_best(ctx, night)
    raise SystemExit("autoresearch: prepare.py or the prepared validation data changed during "
                     f"a run on {slot.name}; results would not be comparable. Restore them (git checkout "
                     "prepare.py, or re-run `python prepare.py`) and resume, or start a new run with another --tag.")


def undo_tampering(ctx, night, slot, commit):
    """What train.py did to the driver's records (git's config and HEAD in the user's checkout,
    results.tsv, its worktree), undone; "" if nothing. In the sandbox no run can write the user's
    checkout: a change there is a person's, kept (git's config) or put right (HEAD, the branch,
    results.tsv), and no run is blamed for it."""
    problems, blame = [], not sandboxed(ctx)
    config, saved = ctx.git_config or (None, None)
    if config and (config.read_bytes() if config.exists() else None) != saved:
        if blame:
            problems.append("train.py changed git's config (.git/config); restored")
            records.write_atomic(config, saved.decode()) if saved is not None else config.unlink()
        else:
            ctx.git_config = records.read_git_config(ctx.repo)
    moved_from = records.on_branch(ctx.repo, night.branch)
    if moved_from:
        problems.append(f"train.py moved git's HEAD to {moved_from.removeprefix('refs/heads/')}")
    if git(ctx.repo, "rev-parse", "HEAD") != night.best.commit:
        problems.append("train.py moved the driver's branch")
        git(ctx.repo, "reset", "-q", "--soft", night.best.commit)
    deleted = not ctx.tsv.exists()
    note = records.sync_tsv(ctx.tsv, night.rows, ctx.run_dir, strict=blame) or \
        ("results.tsv was deleted; rewritten from the journal" if deleted else "")
    if note:
        problems.append(f"train.py wrote to results.tsv ({note})")
    if not blame and problems:
        print(f"  note: put right, not done by the run (in the sandbox it cannot write here): "
              f"{'; '.join(problems).replace('train.py ', 'something ')}", flush=True)
        problems = []
    if (slot.worktree / ".git").exists():
        problems.append(slots.worktree_moved(slot, commit))
        if records.sha256_file(slot.worktree / "prepare.py") != night.metric_hashes["prepare.py"]:
            problems.append("train.py changed prepare.py, the metric, in its worktree")
    return "; ".join(p for p in problems if p)


