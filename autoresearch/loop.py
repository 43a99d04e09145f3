"""The loop: propose -> run -> decide -> record, one experiment at a time.

Every step is resumable: an experiment's progress lives in the journal's pending entry, so
a driver killed at any instant resumes with no row lost or doubled and no GPU run repeated
that had been recorded.
"""

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from autoresearch import decisions, edits, llm, prompt, records, training
from autoresearch.records import Best, Experiment, Final, Run, git

FIX_ATTEMPTS = 2                   # times a crashed run goes back to the LLM for a fix
EDIT_ATTEMPTS = 3                  # times an invalid edit goes back to the LLM
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

    @property
    def tsv(self):
        return self.repo / "results.tsv"

    @property
    def journal(self):
        return self.run_dir / "journal.json"

    @property
    def price_known(self):
        return llm.model_price(self.model) is not None


def run_night(ctx, night):
    """Experiments until a stop condition: the baseline first, then the LLM's ideas."""
    restore_best(ctx, night)  # after a kill: branch and train.py back to the best
    while True:
        p = night.pending
        if p is None:
            reason = stop_reason(ctx, night)
            if reason:
                print(f"stopping: {reason}")
                return
            p = new_experiment(ctx, night)  # 1. propose
            if p is None:
                continue
            night.pending, night.next_n = p, p.n + 1
            save_state(ctx, night)
        started = time.time()
        best_before = statistics.fmean(night.best_vals) if night.best_vals else None
        final = record(ctx, night, p) if p.final else run_experiment(ctx, night, p)  # 2.-4. run, decide, record
        status_line(ctx, night, p, final, best_before, (time.time() - started) / 60)
        if p.kind == "baseline" and final.status == "crash":
            raise SystemExit(f"autoresearch: the baseline train.py failed: {p.runs[-1].failure}; "
                             f"see {p.runs[-1].log}. Fix train.py, commit it on {night.branch} "
                             f"and run `python driver.py --tag {ctx.tag}` again.")


def save_state(ctx, night):
    records.save_night(ctx.journal, night)


def stop_reason(ctx, night):
    """Why no new experiment starts now ("" when one may)."""
    done = night.next_n - 1
    if ctx.max_experiments is not None and done >= ctx.max_experiments and night.best_vals:
        return f"{done} experiments done (--max-experiments)"
    typical_run_s = night.gpu_s["total"] / max(night.run_counts["total"], 1)
    if ctx.deadline and time.time() + typical_run_s >= ctx.deadline:
        return "the deadline comes before another run could finish"
    if ctx.max_cost and night.spend["usd"] >= ctx.max_cost:
        return f"spend ${night.spend['usd']:.2f} reached --max-cost"
    return ""


# ---------------------------------------------------------------------------
# 1. Propose: the baseline, or the LLM's next idea as validated edits
# ---------------------------------------------------------------------------

def new_experiment(ctx, night):
    """The next pending experiment: the baseline (the committed train.py) until one has run,
    then the LLM's next idea (None if no valid edit came)."""
    n = night.next_n  # counted once the idea is pending, so a kill here re-asks under the same n
    exp_dir = ctx.run_dir / f"{n:04d}"
    exp_dir.mkdir(parents=True, exist_ok=True)
    if not night.best_vals:
        return Experiment(n, "baseline", "baseline", str(exp_dir), str(ctx.repo / "train.py"),
                          night.best.commit, 0)
    best_py = records.train_py_at(ctx.repo, night.best.commit)
    description, source = propose(ctx, night, exp_dir, [], best_py)
    if source is None:
        print(f"{n:4d}  no valid edit after {EDIT_ATTEMPTS} tries; asking for a new idea", flush=True)
        night.next_n = n + 1
        save_state(ctx, night)
        return None
    (exp_dir / "candidate.py").write_text(source)
    (exp_dir / "diff.patch").write_text(edits.unified_diff(best_py, source))
    return Experiment(n, "candidate", description, str(exp_dir), str(exp_dir / "candidate.py"), None,
                      int(time.time()))


def propose(ctx, night, exp_dir, messages, source, conversation_file=None):
    """Ask for an edit of `source` until one validates (EDIT_ATTEMPTS). Returns (description, new
    source) or (None, None); messages (the conversation after the first user turn) grow in place
    and are saved to conversation_file (default: the first attempt's)."""
    conversation_file = conversation_file or exp_dir / "conversation.json"
    program = ctx.repo / "program.md"
    best_py = records.train_py_at(ctx.repo, night.best.commit)
    for _ in range(EDIT_ATTEMPTS):
        program_md = program.read_text() if program.exists() else "(no program.md)"  # read afresh
        request = prompt.build_request(ctx.model, ctx.repo, night.settings, program_md, best_py,
                                       prompt.history_text(night, ctx.greedy), messages)
        records.save_json(exp_dir / "prompt.json", request)
        reply = llm.ask(ctx.client, request)
        replies_path = exp_dir / "reply.json"
        replies = json.loads(replies_path.read_text()) if replies_path.exists() else []
        records.save_json(replies_path, replies + [reply.model_dump(mode="json")])
        add_spend(ctx, night, exp_dir, reply.usage)
        # The assistant turn goes back verbatim: models that think (on by default since Claude 5)
        # reject a follow-up whose thinking blocks were dropped or altered.
        messages.append({"role": "assistant",
                         "content": [b.model_dump(mode="json", exclude_none=True) for b in reply.content]})
        tool = next((b for b in reply.content if b.type == "tool_use"), None)
        if tool is None:
            messages.append({"role": "user", "content": f"Reply by calling the {edits.TOOL_NAME} tool."})
            continue
        args = tool.input if isinstance(tool.input, dict) else {}
        new, error = edits.apply_edits(source, args.get("edits"), set(night.tried))
        if new is not None:
            night.tried.append(records.sha256_bytes(new.encode()))
            records.save_json(conversation_file, messages)
            return records.clean_description(args.get("description", "")), new
        print(f"  edit rejected: {error}", flush=True)
        messages.append({"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": tool.id, "is_error": True, "content": error}]})
    records.save_json(conversation_file, messages)
    return None, None


def add_spend(ctx, night, exp_dir, usage):
    """Add one reply's tokens and cost to the run's total and to the experiment's usage.json."""
    counts, usd = llm.usage_cost(ctx.model, usage)
    path = exp_dir / "usage.json"
    per_exp = json.loads(path.read_text()) if path.exists() else {"usd": 0.0}
    for spend in (night.spend, per_exp):
        for k, v in counts.items():
            spend[k] = spend.get(k, 0) + v
        spend["usd"] += usd or 0.0
    per_exp["price_known"] = usd is not None
    records.save_json(path, per_exp)
    save_state(ctx, night)  # spend is never lost, whatever happens next


def conversation_path(p, attempt):
    """Each attempt's conversation in a file of its own: a kill before a fix is recorded re-asks
    from the attempt's own conversation, never from one that holds the unrecorded fix."""
    return Path(p.dir) / ("conversation.json" if attempt == 0 else f"conversation-{attempt + 1}.json")


def ask_for_fix(ctx, night, p, failed):
    """Send the failed run's log tail back to the LLM; a valid fix becomes the next attempt.
    False when no valid fix came."""
    exp_dir = Path(p.dir)
    path = conversation_path(p, p.attempt)
    messages = json.loads((path if path.exists() else exp_dir / "conversation.json").read_text())  # (older drivers)
    last_tool = next(b["id"] for b in reversed(messages[-1]["content"]) if b["type"] == "tool_use")
    tail = "\n".join(Path(failed.log).read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:])
    messages.append({"role": "user", "content": [{
        "type": "tool_result", "tool_use_id": last_tool, "is_error": True,
        "content": f"The run failed: {failed.failure}.\n\nLast lines of its log:\n{tail}"
                   "\n\nFix train.py with another edit (edits apply to the file as you left it)."}]})
    if p.commit:
        keep_discarded(ctx, f"{p.n:04d}-{p.attempt + 1}", p.commit)
    description, source = propose(ctx, night, exp_dir, messages, Path(p.source).read_text(),
                                  conversation_path(p, p.attempt + 1))
    if source is None:
        return False
    p.attempt += 1
    p.fix_description = description
    p.source = str(exp_dir / f"candidate-{p.attempt + 1}.py")
    Path(p.source).write_text(source)
    p.commit, p.commit_date = None, int(time.time())
    save_state(ctx, night)
    return True


# ---------------------------------------------------------------------------
# 2. Run: commit the candidate, train once, check what train.py may have touched
# ---------------------------------------------------------------------------

def restore_best(ctx, night):
    """Branch back to the best commit and train.py from it; no other file is touched, and no
    branch but the driver's moves (HEAD is put back on it first if train.py moved it)."""
    records.on_branch(ctx.repo, night.branch)
    git(ctx.repo, "reset", "-q", "--soft", night.best.commit)
    git(ctx.repo, "checkout", "-q", night.best.commit, "--", "train.py")


def keep_discarded(ctx, name, commit):
    """A discarded attempt stays reachable (and its diff readable) under a ref."""
    git(ctx.repo, "update-ref", f"refs/autoresearch/{ctx.tag}/discarded/{name}", commit)


def commit_candidate(ctx, night, p):
    """Commit train.py alone on top of the best; a fixed date makes a re-commit after a
    restart produce the same commit."""
    repo = ctx.repo
    restore_best(ctx, night)
    (repo / "train.py").write_text(Path(p.source).read_text())
    date = f"{p.commit_date} +0000"
    identity = [] if git(repo, "config", "user.email", check=False) else \
        ["-c", "user.name=autoresearch", "-c", "user.email=autoresearch@localhost"]
    message = p.description + (f" (fix: {p.fix_description})" if p.fix_description else "")
    git(repo, *identity, "commit", "-q", "--no-verify", "-m",
        f"{message}\n\nautoresearch {ctx.tag} experiment {p.n}", "--", "train.py",
        env={"GIT_AUTHOR_DATE": date, "GIT_COMMITTER_DATE": date})
    return git(repo, "rev-parse", "HEAD")


def one_run(ctx, night, p, role, seed):
    """Put the right code in train.py, train once, record the run in the pending experiment."""
    repo = ctx.repo
    if role != "best" and git(repo, "rev-parse", "HEAD") != p.commit:
        p.commit = commit_candidate(ctx, night, p)
        save_state(ctx, night)
    # a repeat of the best leaves the branch on the candidate and only swaps the file
    commit = night.best.commit if role == "best" else p.commit
    git(repo, "checkout", "-q", commit, "--", "train.py")
    log_path = Path(p.dir) / ("train.log" if not p.runs else f"train-{len(p.runs) + 1}.log")
    result = training.run_training(repo, log_path, seed, ctx.timeout_s, night.settings, ctx.run_dir / "training.pid",
                                   ctx.pass_env, ctx.sandbox, ctx.prepare.CACHE_DIR)
    tampered = undo_tampering(ctx, night, p.commit)  # first: a checkout in train.py can swap prepare.py too
    check_metric_unchanged(ctx, night, p, log_path)
    if tampered:
        print(f"  run refused: {tampered}", flush=True)
        result = training.RunResult(None, 0.0, result.seconds, f"refused: {tampered}")
    p.runs.append(Run(role, seed, commit, p.attempt, result.val_bpb, result.peak_vram_mb,
                      result.seconds, result.failure, str(log_path)))
    if role == "best" and result.val_bpb is not None:  # the incumbent's mean sharpens with repeats
        night.groups.setdefault(night.best.commit, []).append(result.val_bpb)
    night.gpu_s["total"] += result.seconds
    night.run_counts["total"] += 1
    if role != "candidate" or len(attempt_runs(p)) > 1:
        night.gpu_s["noise"] += result.seconds
        night.run_counts["noise"] += 1
    save_state(ctx, night)
    return result


def check_metric_unchanged(ctx, night, p, log_path):
    """Numbers from a different metric are never compared or recorded: stop the run."""
    if metric_hashes(ctx.repo, ctx.prepare) != night.metric_hashes:
        restore_best(ctx, night)
        night.pending = None
        save_state(ctx, night)
        raise SystemExit("autoresearch: prepare.py or the prepared validation data changed during "
                         f"run {log_path}; results would not be comparable. Restore them (or "
                         "re-run `python prepare.py`) and start a new run with another --tag.")


def undo_tampering(ctx, night, head):
    """What train.py did to the driver's records (results.tsv, git's HEAD), undone; "" if nothing."""
    problems = []
    moved_from = records.on_branch(ctx.repo, night.branch)
    if moved_from:
        problems.append(f"train.py moved git's HEAD to {moved_from.removeprefix('refs/heads/')}")
    if git(ctx.repo, "rev-parse", "HEAD") != head:
        problems.append("train.py moved the driver's branch")
        git(ctx.repo, "reset", "-q", "--soft", head)
    note = records.sync_tsv(ctx.tsv, night.rows, ctx.run_dir, strict=True)
    if note:
        problems.append(f"train.py wrote to results.tsv ({note})")
    return "; ".join(problems)


def metric_hashes(repo, prepare):
    """Hashes of prepare.py and every prepared file the metric reads."""
    files = [Path(repo) / "prepare.py"] + [Path(f) for f in prepare.metric_files()]
    return {str(f): records.sha256_file(f) for f in files}


# ---------------------------------------------------------------------------
# 3. Decide: fixes, repeats and the rule (decisions.decide)
# ---------------------------------------------------------------------------

def attempt_runs(p, roles=("candidate",)):
    """The experiment's runs of the current attempt's code (a fix after a crash is a new attempt)."""
    return [r for r in p.runs if r.role in roles and r.attempt == p.attempt]


def measured(runs):
    """val_bpb of the runs that produced one."""
    return [r.val_bpb for r in runs if r.val_bpb is not None]


def next_seed(night):
    night.next_seed += 1
    return night.next_seed


def run_experiment(ctx, night, p):
    """Drive the pending experiment to its final rows: runs, fixes, repeats, decision."""
    while True:
        cand = attempt_runs(p)
        if not cand:
            one_run(ctx, night, p, "candidate", BASE_SEED)
            continue
        if cand[0].val_bpb is None:  # the attempt's first run failed
            if p.kind == "baseline" or p.attempt >= ctx.fix_attempts or not ask_for_fix(ctx, night, p, cand[0]):
                return record(ctx, night, p, "crash", "")
            continue
        if p.kind == "baseline":
            if len(p.runs) < ctx.noise_runs:
                one_run(ctx, night, p, "noise", next_seed(night))
                continue
            return record(ctx, night, p, "keep", "")
        vals = measured(cand)
        no_repeat = "a repeat crashed" if any(r.val_bpb is None for r in cand[1:]) else \
            "" if decisions.budget_allows(night.run_counts) else "noise budget spent"
        action, note = decisions.decide(vals, night.best_vals, night.sigma, ctx.greedy, no_repeat)
        if action == "repeat":
            one_run(ctx, night, p, "candidate", next_seed(night))
        elif action == "repeat_best":
            one_run(ctx, night, p, "best", next_seed(night))
        else:
            if note and len(vals) > 1 and len(set(vals)) == 1:
                action, note = "discard", "refused: identical val_bpb on different seeds " \
                    "(train.py ignores AUTORESEARCH_SEED)"
            return record(ctx, night, p, action, note)


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
            text = f"repeat of best (seed {r.seed}): {night.best.description}{crash}"
        else:
            text = (description if r.attempt == p.attempt else p.description) + crash
            if i > 1:
                text = f"repeat {i}/{decisions.CONFIRM_RUNS} (seed {r.seed}): {text}"
            elif note and not failed:
                text += f" [{note}]"
            row_status = status
        lines.append(records.format_row(r.commit, r.val_bpb, r.peak_vram_mb,
                                        "crash" if failed else row_status, text))
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
    night.pending = None
    save_state(ctx, night)
    restore_best(ctx, night)
    return final


def short_best(night):
    vals = night.best_vals
    return f"{statistics.fmean(vals):.6f} ({night.best.commit[:7]})" if vals else "none yet"


def status_line(ctx, night, p, final, best_before, minutes):
    """One line per experiment: number, val_bpb, delta vs best, status, minutes, cost, totals."""
    vals = measured(attempt_runs(p))
    mean = statistics.fmean(vals) if vals else None
    val = f"{mean:.6f}" if vals else "   -    "
    delta = f"{mean - best_before:+.6f}" if vals and best_before is not None else "    -    "
    sigma = f" sigma {night.sigma:.6f}" if night.sigma and not ctx.greedy else ""
    usage_file = Path(p.dir) / "usage.json"
    cost = json.loads(usage_file.read_text())["usd"] if usage_file.exists() else 0.0
    cost_text = f"${cost:.3f}" if ctx.price_known else "$?"
    total = f"${night.spend['usd']:.2f}" if ctx.price_known else "cost unknown"
    note = f" [{final.note}]" if final.note else ""
    print(f"{p.n:4d}  {val} ({delta})  {final.status:7s} {minutes:5.1f} min {cost_text:>7s}  "
          f"{p.description[:60]}{note}  | best {short_best(night)}{sigma}, {total}", flush=True)
