"""Records: the run's state as typed records and its journal, results.tsv, git.

The driver is the only writer of all three. The journal (runs/<tag>/journal.json) is
rewritten atomically after every step, so a killed driver resumes from it; results.tsv is
always the header plus the rows the journal says were written, so a row can be neither lost
nor doubled, and a line the driver did not write is noticed and set aside.
"""

import dataclasses
import hashlib
import json
import os
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from autoresearch.decisions import pooled_std

TSV_HEADER = "commit\tval_bpb\tmemory_gb\tstatus\tdescription\n"
EXTRA_RUN_RE = re.compile(r"^(repeat|noise run)\b")  # descriptions of rows that are not new ideas
GIT_LOCK_TRIES = 10   # a git command that finds a live lock waits a second and tries again, this often
STALE_LOCK_S = 60.0   # without /proc: a lock file older than this is taken as left by a killed git


# ---------------------------------------------------------------------------
# The run's state (serialised to the journal)
# ---------------------------------------------------------------------------

@dataclass
class Run:
    """One run of train.py; val_bpb is None when it failed, and failure says why."""
    role: str                 # candidate | noise (the baseline's extra seeds) | best (a repeat of the best)
    seed: int
    commit: str
    attempt: int              # a fix after a crash is a new attempt of the same experiment
    val_bpb: float | None
    peak_vram_mb: float
    seconds: float
    failure: str
    log: str
    device_batch: int = 0     # rows per micro-step it was fitted to (0: not said)
    note: str = ""            # e.g. run again at half the device batch after running out of GPU memory


@dataclass
class Final:
    """An experiment's decision and the exact rows it adds to results.tsv."""
    status: str
    rows: list[str]
    note: str


@dataclass
class Experiment:
    """One idea (or the baseline) from its proposal to its rows."""
    n: int
    kind: str                 # baseline | candidate
    description: str
    dir: str
    source: str               # the train.py to commit for the current attempt
    commit: str | None
    commit_date: int          # fixed, so a re-commit after a restart gives the same commit
    attempt: int = 0
    runs: list[Run] = field(default_factory=list)
    fix_description: str = ""
    final: Final | None = None
    parent: str | None = None          # the best when it was proposed: the code it is judged against
    parent_description: str = ""
    edits: list = field(default_factory=list)  # every edit list applied to the parent, in order (to re-apply)
    rebased_attempts: list[int] = field(default_factory=list)  # attempts ahead of a parent no longer the best
    rebased_from: list = field(default_factory=list)  # [attempt, the parent it was measured on], per re-base
    hypothesis: str = ""               # the model's one line: why it should help
    theme: str = ""                    # the kind of change (the notebook's section)


@dataclass
class Best:
    commit: str
    description: str


@dataclass
class Night:
    """Everything a resumed driver needs; one instance, saved after every step."""
    tag: str
    branch: str
    started: str
    settings: dict
    metric_hashes: dict
    best: Best
    groups: dict              # commit -> val_bpb of every run of that code (the best's included)
    sigma: float | None
    rows: list[str]           # every results.tsv line written so far, in order
    next_n: int
    next_seed: int
    tried: list[str]          # sha256 of every train.py tried
    gpu_s: dict               # total / noise: seconds of training
    run_counts: dict          # total / noise: runs
    wins_rejected: int
    spend: dict               # usd and token counts of every LLM reply
    in_flight: list[Experiment]  # proposed and not yet recorded, oldest first
    sandbox: str = ""         # how training runs: "bubblewrap, no network", "off" (said at every start)
    slot_seconds: dict = field(default_factory=dict)  # slot -> seconds spent inside train.py
    wall_s: float = 0.0       # seconds the driver has been running this night, all sessions
    done: int = 0             # experiments recorded (the baseline included)
    themes: dict = field(default_factory=dict)  # theme -> {status: experiments}
    since_keep: int = 0       # ideas recorded since the last one kept (the plateau's streak)
    awaiting: list = field(default_factory=list)  # [n, summary] of finished ideas whose lesson is owed
    condensed_chars: int = 0  # the notebook's length after the model last condensed it
    finished: list = field(default_factory=list)  # every run as it ended: experiment, seed, slot, device batch, ...

    @property
    def experiments_per_hour(self):
        return self.done / (max(self.wall_s, 1e-9) / 3600)

    def duty_cycle(self, slots):
        """Each slot's share of the night's wall time spent inside train.py."""
        return {name: self.slot_seconds.get(name, 0.0) / max(self.wall_s, 1e-9) for name in slots}

    @property
    def best_vals(self):
        """val_bpb of every run of the best code: one list, stored once, in `groups`."""
        return self.groups.get(self.best.commit, [])


class JournalDamaged(Exception):
    """The journal exists but cannot be read."""


def load_night(journal, tsv):
    """The Night in `journal`; journals of the single-file driver (rows counted, best.vals apart
    from groups) are read too."""
    try:
        d = json.loads(Path(journal).read_text())
        if not isinstance(d, dict):
            raise ValueError("not an object")
        best = d["best"]
        if isinstance(d["rows"], int):  # the old driver counted rows: take them from results.tsv
            lines = Path(tsv).read_text().splitlines(True)[1:] if Path(tsv).exists() else []
            d["rows"] = lines[:d["rows"]]
        if "vals" in best:  # the old driver kept the best's values beside its group
            d["groups"][best["commit"]] = best.pop("vals")
        if "pending" in d:  # one experiment at a time, before the pipeline
            pending = d.pop("pending")
            d["in_flight"] = [pending] if pending else []
        in_flight = [Experiment(**{**p, "runs": [Run(**r) for r in p["runs"]],
                                   "final": Final(**p["final"]) if p.get("final") else None,
                                   "fix_description": p.get("fix_description") or "",
                                   "parent": p.get("parent") or best["commit"]}) for p in d["in_flight"]]
        d["metric_hashes"] = {("prepare.py" if k.endswith("/prepare.py") else k): v  # (keyed by path before)
                              for k, v in d["metric_hashes"].items()}
        names = {f.name for f in dataclasses.fields(Night)}
        return Night(**{**{k: v for k, v in d.items() if k in names}, "best": Best(**best), "in_flight": in_flight})
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise JournalDamaged(f"{type(error).__name__}: {error}") from error


def save_night(journal, night):
    save_json(journal, dataclasses.asdict(night))


def rebuild_night(repo, tag, branch, settings, hashes, lines, run_dir, base_seed, run_s):
    """A Night from what outlives a damaged journal: the rows of results.tsv and the git branch.
    The best is the last kept idea (or the baseline), the noise floor comes from every code run
    more than once; an experiment that was in flight is given up (the loop restores the best)."""
    rows = [dict(zip(("commit", "val_bpb", "memory_gb", "status", "description"), line.rstrip("\n").split("\t")))
            for line in lines]
    commits = {r["commit"]: git(repo, "rev-parse", "--verify", "-q", r["commit"] + "^{commit}", check=False)
               for r in rows}
    groups = {}
    for r in rows:
        if r["status"] != "crash" and "refused:" not in r["description"] and commits[r["commit"]]:
            groups.setdefault(commits[r["commit"]], []).append(float(r["val_bpb"]))
    kept = [r for r in rows if r["status"] == "keep" and not is_extra_run(r) and commits[r["commit"]]]
    best = Best(commits[kept[-1]["commit"]], kept[-1]["description"].split(" [")[0]) if kept else \
        Best(git(repo, "rev-parse", branch), "baseline")
    seeds = [int(s) for r in rows for s in re.findall(r"\(seed (\d+)\)", r["description"])]
    numbers = [int(d.name) for d in Path(run_dir).iterdir() if d.name.isdigit()]
    extra = sum(is_extra_run(r) for r in rows)
    return Night(tag=tag, branch=branch, started=time.strftime("%Y-%m-%d %H:%M:%S"), settings=settings,
                 metric_hashes=hashes, best=best, groups=groups, sigma=pooled_std(list(groups.values())),
                 rows=list(lines), next_n=max(numbers, default=-1) + 1, next_seed=max(seeds + [base_seed]) + 1,
                 tried=sorted({sha256_bytes(train_py_at(repo, c).encode()) for c in set(commits.values()) if c}),
                 gpu_s={"total": len(rows) * run_s, "noise": extra * run_s},  # estimated: the logs' times are lost
                 run_counts={"total": len(rows), "noise": extra},
                 wins_rejected=sum("not confirmed" in r["description"] for r in rows if not is_extra_run(r)),
                 spend={"usd": 0.0}, in_flight=[])


# ---------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------

def write_atomic(path, text):
    """Write via a temporary file of its own + fsync + rename, so a kill leaves either the old or the
    new file, and two writers (the driver, `report --serve`) each rename a whole one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with open(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # (mkstemp's 0600 otherwise)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_json(path):
    return json.loads(Path(path).read_text())


def save_json(path, obj):
    write_atomic(path, json.dumps(obj, indent=1, default=str) + "\n")


def metric_hashes(where, prepare):
    """Hashes of prepare.py (in `where`) and every prepared file the metric reads: the metric's identity."""
    return {"prepare.py": sha256_file(Path(where) / "prepare.py"),
            **{str(f): sha256_file(f) for f in prepare.metric_files()}}


def sha256_bytes(data):
    return hashlib.sha256(data).hexdigest()


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_head(path, limit=1 << 20):
    """The first `limit` bytes of a log as text (where the start-up lines are)."""
    with open(path, "rb") as f:
        return f.read(limit).decode(errors="replace")


def read_tail(path, limit=1 << 20):
    """The last `limit` bytes of a log as text (a run can print without bound)."""
    with open(path, "rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - limit))
        return f.read().decode(errors="replace")


def set_aside(path, why, folder=None):
    """Move a file out of the way (into `folder`, default its own; never delete it); its new path."""
    dest = Path(folder or path.parent) / f"{path.stem}-{why}-{time.strftime('%Y%m%d-%H%M%S')}{path.suffix}"
    os.replace(path, dest)
    return dest


# ---------------------------------------------------------------------------
# results.tsv
# ---------------------------------------------------------------------------

def clean_description(text):
    """One line, no tabs: a description never breaks a TSV row."""
    return " ".join(str(text).split())[:300] or "(no description)"


def format_row(commit, val_bpb, peak_vram_mb, status, description):
    """One results.tsv line; a failed run reads 0.000000 and 0.0."""
    if val_bpb is None:
        val_bpb, peak_vram_mb = 0.0, 0.0
    description = clean_description(description)
    if description[0] in "=+-@":  # a spreadsheet would read it as a formula
        description = "'" + description
    return f"{commit[:7]}\t{val_bpb:.6f}\t{peak_vram_mb / 1024:.1f}\t{status}\t{description}\n"


def read_tsv(path):
    """Rows of results.tsv as dicts (val_bpb and memory_gb as floats); lines that are no row are left out."""
    return [row for row in map(parse_row, Path(path).read_text().splitlines()[1:]) if row]


def parse_row(line):
    """One results.tsv line as a dict, or None when it is not a row (a hand edit, a torn line)."""
    parts = line.rstrip("\n").split("\t")
    if len(parts) != 5 or not re.fullmatch(r"\d+(?:\.\d+)?", parts[1]) or not re.fullmatch(r"\d+(?:\.\d+)?", parts[2]):
        return None
    return {"commit": parts[0], "val_bpb": float(parts[1]), "memory_gb": float(parts[2]), "status": parts[3],
            "description": parts[4]}


def is_extra_run(row):
    """A repeat or noise run of code already in the table, not a new idea."""
    return bool(EXTRA_RUN_RE.match(row["description"]))


def sync_tsv(path, lines, aside_folder=None, strict=False):
    """Make results.tsv the header plus `lines`. A file that is a prefix of that (rows not written
    yet, or a write cut by a kill) is completed, unless `strict` (after a run, when nothing may have
    changed it); one holding anything else is set aside (into aside_folder) first. Returns a note
    ("" if none)."""
    path = Path(path)
    expected = TSV_HEADER + "".join(lines)
    data = path.read_text(errors="replace") if path.exists() else ""
    if data == expected:
        return ""
    note = ""
    if strict and not path.exists():
        note = "results.tsv was deleted; rewritten from the journal"
    elif strict or not expected.startswith(data):
        note = (f"results.tsv held lines the driver did not write; kept as {set_aside(path, 'foreign', aside_folder)}, "
                "rewritten from the journal")
    write_atomic(path, expected)
    return note


# ---------------------------------------------------------------------------
# git
# ---------------------------------------------------------------------------

def git(repo, *args, env=None, check=True):
    """Run git in the repo and return stdout; a failure stops with git's message (unless
    check=False: then a failure returns what git printed, usually nothing)."""
    proc = run_git(repo, args, env)
    if check and proc.returncode != 0:
        raise SystemExit(f"autoresearch: git {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout.strip()


def git_succeeds(repo, *args):
    return run_git(repo, args).returncode == 0


def git_input(repo, text, *args):
    """git reading `text` on its standard input (hash-object, mktree); its output."""
    proc = run_git(repo, args, stdin=text)
    if proc.returncode != 0:
        raise SystemExit(f"autoresearch: git {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout.strip()


# The driver's git runs no hook and no command that a run could have planted in the repository
# (.git/hooks, core.fsmonitor): it runs outside any sandbox, with the API key in its environment.
GIT_SAFE = ("-c", "core.hooksPath=/dev/null", "-c", "core.fsmonitor=false")


def run_git(repo, args, env=None, stdin=None):
    """git, its messages in English, with no hooks (GIT_SAFE); a lock file left by a killed git is
    removed, one that a live git holds is waited for."""
    for _ in range(GIT_LOCK_TRIES):
        proc = subprocess.run(["git", *GIT_SAFE, *args], cwd=repo, capture_output=True, text=True, input=stdin,
                              env={**os.environ, "LC_ALL": "C", "LANGUAGE": "C", **(env or {})})
        lock = re.search(r"Unable to create '([^']+\.lock)': File exists", proc.stderr)
        if proc.returncode == 0 or not lock:
            return proc
        if not remove_stale_lock(repo, Path(lock[1])):
            time.sleep(1.0)
    return proc


def remove_stale_lock(repo, lock):
    """Remove a git lock file (e.g. .git/index.lock) that no live git holds: a driver killed
    mid-command leaves one, and every later git command would fail on it. True if removed."""
    if git_running_in(repo) or (not Path("/proc").is_dir() and lock.exists()
                                and time.time() - lock.stat().st_mtime < STALE_LOCK_S):
        return False
    print(f"removing {lock}, left by a git process that was killed", flush=True)
    lock.unlink(missing_ok=True)
    return True


def git_running_in(repo):
    """Whether a git process works in this repository now (Linux: read from /proc)."""
    top = Path(repo).resolve()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if Path(os.readlink(proc / "exe")).name.startswith("git") and Path(os.readlink(proc / "cwd")) == top:
                return True
        except OSError:
            continue
    return False


def train_py_at(repo, commit):
    """train.py as committed, byte for byte."""
    return subprocess.run(["git", *GIT_SAFE, "show", f"{commit}:train.py"], cwd=repo, capture_output=True, text=True,
                          check=True).stdout


def read_git_config(repo):
    """(path, bytes) of the repository's own git config (.git/config, shared by its worktrees)."""
    path = Path(git(repo, "rev-parse", "--path-format=absolute", "--git-common-dir")) / "config"
    return path, path.read_bytes() if path.exists() else None


def on_branch(repo, branch):
    """Put HEAD back on the driver's branch if something moved it (a `git checkout` in train.py),
    moving no branch. Returns where HEAD was ("" if it had not moved)."""
    head = git(repo, "symbolic-ref", "-q", "HEAD", check=False) or git(repo, "rev-parse", "HEAD")
    if head == f"refs/heads/{branch}":
        return ""
    if not git_succeeds(repo, "checkout", "-q", branch):  # carries the user's own edits back
        git(repo, "symbolic-ref", "HEAD", f"refs/heads/{branch}")  # a conflict: keep every file as it is
        git(repo, "reset", "-q")
    return head
