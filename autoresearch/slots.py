"""Training slots: one per GPU, each training in its own git worktree, or Ray tasks past one box.

A slot runs one training run at a time in a thread of its own and reports the result to the
loop's event queue; the loop (the main thread) stays the only writer of git, the journal and
results.tsv. Candidates are committed with git's plumbing (a tree with the new train.py on top
of the parent), so the user's checkout is never touched by a run.
"""

import math
import os
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path

from autoresearch import records, training
from autoresearch.records import git


@dataclass
class Slot:
    """One GPU (gpu: its CUDA_VISIBLE_DEVICES value; None: the driver's own) and its worktree."""
    name: str
    gpu: str | None
    worktree: Path
    job: tuple | None = None             # (experiment number, role, seed, commit, log path) while a run is in flight
    ray: object = field(default=None, repr=False)  # a RayRunner, past one box

    @property
    def pid_file(self):
        return self.worktree.parent / f"{self.name}.pid"


def visible_gpus():
    """This process's CUDA_VISIBLE_DEVICES as a list of ids ([]: not set, every GPU)."""
    return [g.strip() for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]


def make_slots(run_dir, gpus, ray_runner=None):
    """One slot per GPU: `gpus` is None (the GPU training would use anyway), "all", or "0,1,..."."""
    if ray_runner:
        return [Slot(f"ray{i}", None, run_dir / "slots" / f"ray{i}", ray=ray_runner) for i in range(ray_runner.gpus)]
    if gpus is None:
        return [Slot("gpu", None, run_dir / "slots" / "gpu")]
    if gpus == "all":  # every GPU this process may use: CUDA_VISIBLE_DEVICES's list, if set
        import torch
        ids = (visible_gpus() or [str(i) for i in range(torch.cuda.device_count())])[:torch.cuda.device_count()]
        if not ids:
            raise SystemExit("autoresearch: --gpus all, but torch sees no CUDA GPU")
    else:
        ids = check_gpus(gpus)
    return [Slot(f"gpu{i}", i, run_dir / "slots" / f"gpu{i}") for i in ids]


def check_gpus(gpus):
    """The GPU ids of --gpus 0,1,2,3 (None or "all": checked when the slots are made)."""
    if gpus is None or gpus == "all":
        return None
    ids = [g.strip() for g in gpus.split(",") if g.strip()]
    if not ids or len(set(ids)) != len(ids):
        raise SystemExit(f"autoresearch: --gpus {gpus!r}: give GPU ids like 0,1,2,3 (each once) or all")
    return ids


def commit_candidate(repo, parent, source, message, date):
    """A commit of `source` as train.py on top of `parent`, made without touching any checkout;
    the same inputs give the same commit (a fixed date), so a re-commit after a kill is a no-op."""
    identity = {} if git(repo, "config", "user.email", check=False) else {
        "GIT_AUTHOR_NAME": "autoresearch", "GIT_AUTHOR_EMAIL": "autoresearch@localhost",
        "GIT_COMMITTER_NAME": "autoresearch", "GIT_COMMITTER_EMAIL": "autoresearch@localhost"}
    blob = records.git_input(repo, source, "hash-object", "-w", "--stdin")
    entries = [line for line in git(repo, "ls-tree", parent).splitlines() if not line.endswith("\ttrain.py")]
    tree = records.git_input(repo, "\n".join(entries + [f"100644 blob {blob}\ttrain.py"]) + "\n", "mktree")
    return git(repo, "commit-tree", tree, "-p", parent, "-m", message,
               env={**identity, "GIT_AUTHOR_DATE": f"{date} +0000", "GIT_COMMITTER_DATE": f"{date} +0000"})


def prepare_worktree(repo, slot, commit):
    """The slot's worktree, detached at `commit`, clean (a previous run's files removed)."""
    if not (slot.worktree / ".git").exists():
        shutil.rmtree(slot.worktree, ignore_errors=True)
        git(repo, "worktree", "prune")
        slot.worktree.parent.mkdir(parents=True, exist_ok=True)
        git(repo, "worktree", "add", "-q", "--detach", "-f", str(slot.worktree), commit)
    else:
        git(slot.worktree, "checkout", "-q", "--detach", "-f", commit)
        git(slot.worktree, "clean", "-q", "-fdx")


def worktree_moved(slot, commit):
    """What a run did to its own worktree's git state ("" if nothing)."""
    if git(slot.worktree, "symbolic-ref", "-q", "HEAD", check=False):
        return "train.py moved git's HEAD in its worktree onto a branch"
    if git(slot.worktree, "rev-parse", "HEAD") != commit:
        return "train.py moved git's HEAD in its worktree"
    return ""


def start(slot, ctx, night, job, events, check_below=math.inf, fill_cache=False, retry_until=None):
    """Start one training run on the slot; its result arrives in `events` as ("run", slot, result).
    job: (experiment number, role, seed, commit, log path); a score below check_below is checked,
    fill_cache: trusted code (the baseline), whose compile cache later runs start from; retry_until:
    the last time a run that ran out of GPU memory may start again (training.run_training)."""
    n, role, seed, commit, log_path = job
    slot.job = job
    if slot.ray:
        source = records.train_py_at(ctx.repo, commit)
        target = lambda: slot.ray.run(source, ctx, night, seed, log_path, check_below, fill_cache,  # noqa: E731
                                      retry_until)
    else:
        prepare_worktree(ctx.repo, slot, commit)
        target = lambda: training.run_training(  # noqa: E731
            slot.worktree, log_path, seed, ctx.timeout_s, night.settings, slot.pid_file, ctx.pass_env,
            ctx.sandbox, ctx.prepare.CACHE_DIR, None if slot.gpu is None else {"CUDA_VISIBLE_DEVICES": slot.gpu},
            readable=[ctx.repo], prepare=ctx.prepare, hidden=[ctx.run_dir.parent], check_below=check_below,
            fill_cache=fill_cache, limits=ctx.limits, retry_until=retry_until)
    in_thread(events, "run", slot, target)


def in_thread(events, kind, key, target):
    """target() in a thread of its own; its result, or the exception it raised, goes to `events`
    as (kind, key, result) or ("error", key, exception) (the loop re-raises it)."""
    def report():
        try:
            events.put((kind, key, target()))
        except BaseException as error:  # noqa: BLE001
            events.put(("error", key, error))
    threading.Thread(target=report, daemon=True).start()


def end_runs(slots, run_dir):
    """End what trains for this run: the groups a killed driver left running (at start: every pid
    file of the run, whatever slots it had), or those of this driver when it stops (Ctrl-C,
    SIGTERM, an error), and the Ray tasks still in flight: never an orphan on a GPU."""
    for pid_file in sorted({*Path(run_dir).glob("slots/*.pid"), *(slot.pid_file for slot in slots)}):
        training.kill_stale_training(pid_file)
    for slot in slots:
        if slot.ray:
            slot.ray.cancel_all()


def remove_worktrees(repo, slots):
    """The slots' worktrees removed (the night is over, or stopped: a resume makes them again), and
    any that git still lists but that are gone."""
    for slot in slots:
        if (slot.worktree / ".git").exists():
            git(repo, "worktree", "remove", "--force", "--force", str(slot.worktree), check=False)
        shutil.rmtree(slot.worktree, ignore_errors=True)
    git(repo, "worktree", "prune", check=False)
