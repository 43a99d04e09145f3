"""One training run: `python train.py` in its own process group, with an allow-listed
environment and a hard timeout, its output in a log, scored by the driver (scoring.py), never by
the numbers it prints, and checked by a fresh process when it could be kept.
"""

import importlib.util
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from autoresearch import prompt, records, scoring
from autoresearch.records import read_head, read_tail, write_atomic

PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # the folder holding this package

KILL_GRACE_S = 10.0                # SIGTERM to SIGKILL of the training process group
TIMEOUT_ALLOWANCE_S = 300.0        # default timeout: 2 x TIME_BUDGET plus this (start-up, compile, eval)
VAL_BPB_RANGE = (0.0, 100.0)       # an honest val_bpb lies strictly inside (a byte holds 8 bits)
SETTINGS_KEYS = ("max_seq_len", "time_budget", "eval_tokens")
# What training needs from the driver's environment, and nothing else: no keys, tokens,
# database URLs or webhooks, no proxies. More with --pass-env NAME.
PASS_ENV_NAMES = {"PATH", "HOME", "USER", "LOGNAME", "SHELL", "TERM", "TZ", "LANG", "LANGUAGE", "TMPDIR",
                  "PYTHONPATH", "PYTHONHOME", "PYTHONNOUSERSITE", "VIRTUAL_ENV", "LD_LIBRARY_PATH", "XDG_CACHE_HOME",
                  "CC", "CXX", "CPATH", "LIBRARY_PATH", "C_INCLUDE_PATH", "CPLUS_INCLUDE_PATH"}  # compilers: Triton
PASS_ENV_PREFIXES = ("AUTORESEARCH_", "LC_", "CUDA_", "NVIDIA_", "TORCH", "PYTORCH_", "TRITON_", "OMP_",
                     "MKL_", "NCCL_", "CUDNN_", "CUBLAS_", "CONDA_")
SUPERVISE = Path(__file__).with_name("supervise.py")  # every run's parent: its limits, and no process left
# A run that ran out of GPU memory (train.py's estimate missed what its code needs) runs once more at
# half the device batch its "fit:" line (prepare.fit_device_batch) names.
OUT_OF_MEMORY = re.compile(r"^(?:torch\.(?:cuda\.)?)?OutOfMemoryError: |^RuntimeError: .*(?:CUDA out of memory|"
                           r"CUDA error: out of memory|CUBLAS_STATUS_ALLOC_FAILED|CUDNN_STATUS_ALLOC_FAILED)", re.M)
FIT_LINE = re.compile(r"^fit: [^\n]*?\bdevice batch (\d{1,6}) rows", re.M)
STOPPED = re.compile(r"^error: ([^\x00-\x1f\x7f]{1,300})$", re.M)  # prepare.fail's one line (train.py stopped itself)
GiB = 2**30


@dataclass
class Limits:
    """What one run may use (--run-limits), far above what the real train.py needs at the defaults
    (a model's weights, a few hundred MB; a log of a few MB; tens of processes): a run past one is
    killed and is a crash row that says which, its files removed (its log kept)."""
    file: int = 16 * GiB           # one file's size (the largest weights the scorer takes)
    written: int = 32 * GiB        # bytes on disk in its run directory, /tmp, socket folder and cache copy
    output: int = 1 * GiB          # what it prints (its log)
    processes: int = 1024          # processes at once
    tasks: int = 16384             # processes and threads: the kernel's ceiling, where it can be set

    def describe(self):
        return (f"file {self.file / GiB:g}G, written {self.written / GiB:g}G, output {self.output / GiB:g}G, "
                f"processes {self.processes}")


def parse_limits(text):
    """--run-limits written=64G,file=20G,output=2G,processes=2048 (K, M, G suffixes; unnamed ones
    keep their defaults)."""
    limits = Limits()
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        m = re.fullmatch(r"(\d+(?:\.\d+)?)([KMG]?)", value.strip().upper())
        if name.strip() not in ("file", "written", "output", "processes") or not m or float(m[1]) <= 0:
            raise SystemExit(f"autoresearch: --run-limits {text!r}: give name=value pairs among file, written, "
                             "output (bytes, K/M/G) and processes, e.g. written=64G,processes=2048")
        setattr(limits, name.strip(), int(float(m[1]) * 1024 ** "_KMG".index(m[2] or "_")))
    limits.tasks = max(limits.tasks, 16 * limits.processes)
    return limits


@dataclass
class RunResult:
    """One training run: val_bpb is None when it failed, and failure says why."""
    val_bpb: float | None
    peak_vram_mb: float
    seconds: float
    failure: str
    device_batch: int = 0          # rows per micro-step it was fitted to (its "fit:" line; 0: none)
    note: str = ""                 # e.g. that it ran out of memory and was run again at half the device batch
    out_of_memory: bool = False


def default_timeout_s(time_budget):
    return 2 * time_budget + TIMEOUT_ALLOWANCE_S


def passes(name, pass_env=()):
    return name in PASS_ENV_NAMES or name.startswith(PASS_ENV_PREFIXES) or name in pass_env


def training_env(seed, pass_env=(), extra=None):
    """An allow-list of the driver's environment (see PASS_ENV_*), plus the seed (and `extra`)."""
    env = {k: v for k, v in os.environ.items() if passes(k, pass_env)}
    env.update(extra or {}, AUTORESEARCH_SEED=str(seed), PYTHONUNBUFFERED="1")
    return env


def withheld_names(pass_env=()):
    """The driver's environment variables train.py does not get (said once at start)."""
    return sorted(k for k in os.environ if not passes(k, pass_env))


def kill_group(proc):
    """SIGTERM the whole process group (the supervisor passes it on to every descendant, also those
    that left the group, and kills what is left after KILL_GRACE_S), then SIGKILL whatever is left."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=KILL_GRACE_S + 5)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def kill_stale_training(pid_file):
    """A driver killed with -9 leaves its training group running: end it before going on."""
    if not pid_file.exists():
        return
    pid = int(pid_file.read_text() or 0)
    try:
        if pid and b"train.py" in Path(f"/proc/{pid}/cmdline").read_bytes() and os.getpgid(pid) == pid:
            print(f"ending the training process group {pid} left by a previous driver", flush=True)
            os.killpg(pid, signal.SIGTERM)  # (its supervisor ends every descendant, then itself)
            deadline = time.time() + KILL_GRACE_S + 5
            while time.time() < deadline and alive(pid):
                time.sleep(0.1)
            os.killpg(pid, signal.SIGKILL)
    except (OSError, ProcessLookupError):
        pass  # already gone
    pid_file.unlink(missing_ok=True)  # (the run's own thread may remove it meanwhile)


def alive(pid):
    """Whether a process runs (not a zombie that its new parent has yet to reap)."""
    try:
        return Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return False


def number(text):
    """A summary value as a float (nan if it is not a number)."""
    try:
        return float(text)
    except (TypeError, ValueError):
        return float("nan")


def summary_blocks(log_text):
    """The text after each `---` line of the log that reports a val_bpb."""
    return [b for b in re.split(r"(?:^|\n)---\n", log_text)[1:] if re.search(r"^val_bpb:", b, re.M)]


def parse_summary(block):
    """key: value pairs of a summary block (regex, never an LLM)."""
    return dict(re.findall(r"^([a-z_]+):[ \t]+(\S+)[ \t]*$", block, re.M))


SCORED_THEN_FAILED = "refused: train.py exited with code"  # a run that knew its score: no fix, no second draw


def fixable(failure):
    """Whether a failed run may go back to the LLM for a fix: not one that failed after it was scored
    (it knew its score, so failing then could buy another draw)."""
    return not failure.startswith(SCORED_THEN_FAILED) and "after its model was scored" not in failure


def impossible(val_bpb):
    """Why the driver's own score cannot be a model's ("" when it can)."""
    if VAL_BPB_RANGE[0] < val_bpb < VAL_BPB_RANGE[1]:
        return ""
    return f"refused: val_bpb {val_bpb:.6f} is impossible (bits per byte lie between 0 and 100)"


def summary_failure(log_text, returncode, settings, seed):
    """Why a finished run's summary cannot be compared ("" when it can)."""
    blocks = summary_blocks(log_text)
    if not blocks:
        return f"no val_bpb in the output (exit code {returncode})"
    if len(blocks) > 1 or len(re.findall(r"^val_bpb:", blocks[0], re.M)) > 1:
        return "refused: more than one summary block (val_bpb) in the output; train.py must print one"
    summary = parse_summary(blocks[0])
    val_bpb = number(summary["val_bpb"])
    if not math.isfinite(val_bpb):
        return f"val_bpb is {summary['val_bpb']}"
    if impossible(val_bpb):
        return f"refused: val_bpb {summary['val_bpb']} is impossible (bits per byte lie between 0 and 100)"
    for key in SETTINGS_KEYS:
        if number(summary.get(key)) != float(settings[key]):
            return (f"refused: the summary reports {key} {summary.get(key, '(missing)')} but "
                    f"the driver runs with {settings[key]}; evaluation settings must not change")
    if summary.get("seed") != str(seed):
        return (f"refused: the summary reports seed {summary.get('seed', '(missing)')} but the "
                f"driver set AUTORESEARCH_SEED={seed}; train.py must use and print that seed")
    return ""


def run_training(repo, log_path, seed, timeout_s, settings, pid_file, pass_env=(), sandbox=None, cache_dir=None,
                 extra_env=None, readable=(), prepare=None, hidden=(), check_below=math.inf,
                 fill_cache=False, limits=None, retry_until=None):
    """One run (run_once), and when it ran out of GPU memory before it was scored, once more at half
    the device batch it was fitted to (AUTORESEARCH_DEVICE_BATCH), if that can start before
    `retry_until` (a time; None: whenever): the same run of the same experiment, its note says so,
    the first try's log is kept beside (<log>-oom.log) and its seconds are counted."""
    args = (repo, log_path, seed, timeout_s, settings, pid_file, pass_env, sandbox, cache_dir)
    options = dict(readable=readable, prepare=prepare, hidden=hidden, check_below=check_below, fill_cache=fill_cache,
                   limits=limits)
    first = run_once(*args, extra_env, **options)
    if not (first.out_of_memory and first.device_batch > 1) or (retry_until and time.time() >= retry_until):
        return first
    half = first.device_batch // 2
    print(f"  {Path(log_path).parent.name}: out of GPU memory at device batch {first.device_batch}; running it again "
          f"at {half}", flush=True)
    log_path = Path(log_path)
    os.replace(log_path, log_path.with_name(log_path.stem + "-oom.log"))
    scoring.remove(log_path.with_name(log_path.stem + "-files"))  # (nothing the first try wrote reaches the second)
    result = run_once(*args, {**(extra_env or {}), "AUTORESEARCH_DEVICE_BATCH": str(half)}, **options)
    result.seconds += first.seconds
    result.note = f"out of GPU memory at device batch {first.device_batch}: run again at {half}" + (
        ", out of memory again" if result.out_of_memory else "")
    return result


def run_once(repo, log_path, seed, timeout_s, settings, pid_file, pass_env=(), sandbox=None, cache_dir=None,
             extra_env=None, readable=(), prepare=None, hidden=(), check_below=math.inf, fill_cache=False, limits=None):
    """Run `python train.py` in `repo` (a slot's worktree) time-boxed, under the supervisor and its
    `limits`, with `extra_env` (e.g. the slot's CUDA_VISIBLE_DEVICES), in the sandbox when there is
    one (`readable` read-only, e.g. the user's checkout that holds the worktree's git data; `hidden`,
    e.g. the night's logs, and the validation data not there at all; writable: only the run's own
    directory, $AUTORESEARCH_RUN_DIR beside its log, its own /tmp beside that, and its own copy of the
    compile cache), scored by the driver's scorer (`prepare`'s rows), and checked by a fresh process
    when it scores below `check_below`. `fill_cache`: a run of trusted code (the baseline) whose
    compile cache later runs start from. It ends when this process dies (the supervisor's parent-death
    signal: also a Ray worker killed to cancel its task, where no driver cleans up on its node)."""
    start, limits = time.time(), limits or Limits()
    files = Path(log_path).with_name(Path(log_path).stem + "-files")  # the run's own directory, for what it writes
    tmp = Path(log_path).with_name(Path(log_path).stem + "-tmp")  # its /tmp (on disk, counted, removed after)
    scoring.remove(tmp)
    for folder in (files, tmp):
        folder.mkdir(parents=True, exist_ok=True)
    sock_dir, trusted = scoring.short_socket_dir(), scoring.short_socket_dir()  # (in /tmp: no sandbox sees them)
    scorer = None
    try:
        argv = [sys.executable, "train.py"]
        extra = {**(extra_env or {}), "AUTORESEARCH_RUN_DIR": str(files), "AUTORESEARCH_SCORER": str(sock_dir / "s"),
                 "PYTHONPATH": python_path(), "TMPDIR": str(tmp)}
        boxed = bool(sandbox and sandbox.bwrap)
        layer = trusted / "layer" if boxed else None  # the run's own compile cache (its path hidden from the run)
        box = dict(readable=[cache_dir, *readable, PACKAGE_ROOT],
                   hidden=[*hidden, *prepare.validation_files()]) if boxed else {}
        if boxed:
            start_cache(Path(cache_dir), layer)
            extra.update(cache_env(cache_dir), TMPDIR="/tmp")
            argv = sandbox.wrap(argv, repo, writable=[files, sock_dir, (layer, cache_path(cache_dir))], tmp=tmp, **box)
        report = trusted / "limit"
        argv = supervised(argv, limits, report, [files, tmp, sock_dir, *([layer] if layer else [])], log_path)
        scorer = scoring.Scorer(prepare, sock_dir / "s", files, trusted, layer, log_path).start()
        with open(log_path, "wb") as log:
            returncode, timed_out = run_group(argv, repo, log, training_env(seed, pass_env, extra), timeout_s, pid_file)
        score, unscored = scorer.finish()
        seconds = time.time() - start
        log_text = read_tail(log_path)
        if score:
            set_aside_scored_output(log_path, score.log_bytes, log_text)
        limit = report.read_text() if report.exists() else ""
        if limit:
            failure = f"stopped at a limit: {limit}" + (" after its model was scored" if score else "")
            scoring.remove(files)  # (what it wrote; its log stays)
        elif timed_out:
            failure = f"timed out after {timeout_s:.0f} s (the whole process group was killed)"
        elif returncode != 0:
            failure = f"{SCORED_THEN_FAILED} {returncode} after its model was scored (a run must exit with 0)" \
                if score else f"no val_bpb: train.py exited with code {returncode} before its model was scored" + \
                "".join(f": {m}" for m in STOPPED.findall(log_text[-4096:])[-1:])
        else:
            failure = unscored or summary_failure(log_text, returncode, settings, seed) or impossible(score.val_bpb)
        if not failure and score.val_bpb < check_below:
            failure = check_score(score, repo, prepare, trusted, pass_env, seed, extra_env, sandbox, cache_dir, box,
                                  timeout_s, limits)
        if not failure and fill_cache and boxed:
            trust_cache(Path(cache_dir), score.cache)  # (as it was before any validation input was seen)
    finally:
        if scorer is not None:
            scorer.finish(wait_s=0)
        scoring.remove(sock_dir, trusted, tmp, files / scoring.WEIGHTS_NAME)
    fitted = FIT_LINE.search(read_head(log_path))
    device_batch = int(fitted[1]) if fitted else 0
    if failure:  # out of memory: its traceback's last line, a run whose scoring never began (no input seen)
        oom = not (score or scorer.began or limit or timed_out) and bool(OUT_OF_MEMORY.search(log_text[-4096:]))
        return RunResult(None, 0.0, seconds, failure, device_batch, out_of_memory=oom)
    vram_mb = number(parse_summary(summary_blocks(log_text)[0]).get("peak_vram_mb"))
    return RunResult(score.val_bpb, vram_mb if math.isfinite(vram_mb) else 0.0, seconds, "", device_batch)


def supervised(argv, limits, report, watch, log_path):
    """argv under supervise.py: its limits held (the reason for a stop written to `report`), every
    process it starts ended with it, and all of it ended when this process dies."""
    config = {"file": limits.file, "written": limits.written, "output": limits.output, "processes": limits.processes,
              "tasks": limits.tasks, "grace_s": KILL_GRACE_S, "report": str(report), "log": str(log_path),
              "watch": [str(w) for w in watch], "parent": os.getpid()}
    return [sys.executable, str(SUPERVISE), json.dumps(config), "--", *argv]


def set_aside_scored_output(log_path, scored_at, log_text):
    """What train.py printed once its scoring began (it may hold validation inputs) goes to a file of
    its own, which no model is shown; the log keeps what came before, and the summary block."""
    log_path = Path(log_path)
    scored = log_path.with_name(log_path.stem + "-scored.log")
    blocks = summary_blocks(log_text)
    summary = f"---\n{blocks[-1].strip()}\n" if blocks else ""
    with open(log_path, "r+b") as log, open(scored, "wb") as out:
        log.seek(scored_at)
        shutil.copyfileobj(log, out, 1 << 20)  # (in chunks: a log can be any size)
        log.seek(scored_at)
        log.truncate()
        log.write(f"\n[{out.tell():,} bytes printed once the model's scoring began are in {scored.name}, which "
                  f"no model is shown]\n{summary}".encode())


def run_group(argv, cwd, log, env, timeout_s, pid_file):
    """Run argv in a process group of its own, output to `log`; (exit code, timed out). The group is
    ended however this returns (also on Ctrl-C or SIGTERM: never a training group left behind)."""
    proc = subprocess.Popen(argv, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env=env, start_new_session=True)
    if pid_file:
        write_atomic(pid_file, str(proc.pid))
    timed_out = False
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        kill_group(proc)
        if pid_file:
            pid_file.unlink(missing_ok=True)
    return proc.returncode, timed_out


def check_score(score, repo, prepare, trusted, pass_env, seed, extra_env, sandbox, cache_dir, box, timeout_s, limits):
    """The check of a score (scoring.check): a fresh process, in a folder of its own with train.py,
    prepare.py and the weights saved before scoring, sees only the probes; "" when it agrees. A failure
    of the driver's own is a refusal that says so, never the end of the night."""
    try:
        return check_in(trusted / "check", score, repo, prepare, pass_env, seed, extra_env, sandbox, cache_dir, box,
                        timeout_s, limits)
    except Exception as error:  # noqa: BLE001
        return f"refused: the driver could not check the score: {type(error).__name__}: {error}"


def check_in(work, score, repo, prepare, pass_env, seed, extra_env, sandbox, cache_dir, box, timeout_s, limits):
    sock_dir, tmp, report = scoring.short_socket_dir(), work.with_name("check-tmp"), work.with_name("check-limit")
    work.mkdir()
    tmp.mkdir()
    for name in ("train.py", "prepare.py"):
        shutil.copy(Path(repo) / name, work / name)
    shutil.copy(score.weights, work / scoring.WEIGHTS_NAME)
    if records.sha256_file(work / scoring.WEIGHTS_NAME) != score.weights_sha256:
        return "refused: the saved weights changed after the run was scored"
    extra = {**(extra_env or {}), "AUTORESEARCH_RUN_DIR": str(work), "AUTORESEARCH_SCORER": str(sock_dir / "check"),
             "AUTORESEARCH_CHECK_AUTOCAST": score.autocast, "PYTHONPATH": python_path(), "TMPDIR": str(tmp)}
    argv, watch = [sys.executable, "-c", "import prepare; prepare.serve_saved_model()"], [work, tmp, sock_dir]
    if sandbox and sandbox.bwrap:  # its compile cache: a copy of the run's as it was before scoring began
        cache = scoring.copy_files(score.cache, work.with_name("check-cache"))  # (score.cache may fill the trusted one)
        extra.update(cache_env(cache_dir), TMPDIR="/tmp")
        argv = sandbox.wrap(argv, work, writable=[work, sock_dir, (cache, cache_path(cache_dir))], tmp=tmp, **box)
        watch.append(cache)
    argv = supervised(argv, limits, report, watch, work / "check.log")
    log = open(work / "check.log", "wb")

    def launch():
        return subprocess.Popen(argv, cwd=work, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=training_env(seed, pass_env, extra), start_new_session=True)
    try:
        failure = scoring.check(score, prepare, sock_dir / "check", launch, timeout_s)
    finally:
        log.close()
        scoring.remove(sock_dir)
    if failure and report.exists():
        return f"refused: the check of its score stopped at a limit: {report.read_text()}"
    if failure:
        tail = read_tail(work / "check.log", 4096).strip().splitlines()[-3:]
        if tail and "exited" in failure:
            failure += prompt.mask_secrets("; its last lines: " + " | ".join(tail))[:600]
    return failure


# ---------------------------------------------------------------------------
# The compile cache: each sandboxed run writes only its own copy of a cache that trusted runs fill
# ---------------------------------------------------------------------------

def cache_path(cache_dir):
    """Where prepare.py points torch's compile cache (TORCHINDUCTOR_CACHE_DIR)."""
    return Path(cache_dir) / "torchinductor"


def cache_env(cache_dir):
    """The environment that points a sandboxed process at the compile cache mounted at cache_path."""
    return {"AUTORESEARCH_CACHE": str(cache_dir), "TRITON_CACHE_DIR": str(cache_path(cache_dir) / "triton-home")}


def manifest_path(cache_dir):
    return Path(cache_dir) / "torchinductor.sha256.json"


def cache_files(root):
    """sha256 of every file under root, by relative path."""
    root = Path(root)
    return {str(f.relative_to(root)): records.sha256_file(f) for f in sorted(root.rglob("*"))
            if f.is_file() and not f.is_symlink()}


def start_cache(cache_dir, layer):
    """The run's own compile cache: a copy of the trusted one, whose files must still be those it was
    filled with (else it is set aside and the run starts cold)."""
    trusted, manifest = cache_path(cache_dir), records.load_json(manifest_path(cache_dir)) \
        if manifest_path(cache_dir).exists() else None
    scoring.remove(layer)
    trusted.mkdir(parents=True, exist_ok=True)  # (where the run's copy is mounted)
    if manifest and trusted.is_dir():
        scoring.copy_files(trusted, layer)
        if cache_files(layer) == manifest:
            return
        print(f"note: the compile cache {trusted} changed since a trusted run filled it; runs start from "
              "an empty one until the next baseline fills it again", flush=True)
        shutil.rmtree(layer)
        manifest_path(cache_dir).unlink(missing_ok=True)
    (layer / "triton-home").mkdir(parents=True)


def trust_cache(cache_dir, snapshot):
    """A trusted run's copy of the compile cache (as it was before scoring began) becomes the one
    later runs start from."""
    trusted, fresh = cache_path(cache_dir), Path(f"{cache_path(cache_dir)}.new")
    shutil.rmtree(fresh, ignore_errors=True)
    scoring.copy_files(snapshot, fresh)
    manifest_path(cache_dir).unlink(missing_ok=True)
    old = Path(f"{trusted}.old")
    shutil.rmtree(old, ignore_errors=True)
    if trusted.exists():
        os.replace(trusted, old)
    os.replace(fresh, trusted)
    shutil.rmtree(old, ignore_errors=True)
    write_atomic(manifest_path(cache_dir), json.dumps(cache_files(trusted)))


def load_prepare(repo):
    """Import the repo's prepare.py (constants and metric_files) without running anything."""
    spec = importlib.util.spec_from_file_location("prepare", Path(repo) / "prepare.py")
    module = importlib.util.module_from_spec(spec)
    previous = sys.modules.get("prepare")
    sys.modules["prepare"] = module  # dataclasses look their module up while it is executed
    try:
        spec.loader.exec_module(module)
    finally:
        if previous is None:
            sys.modules.pop("prepare", None)
        else:
            sys.modules["prepare"] = previous
    return module


def python_path():
    """PYTHONPATH for train.py: the driver's package (prepare.py imports its scorer client) after
    whatever was set."""
    return os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(PACKAGE_ROOT)) if p)

