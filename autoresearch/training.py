"""One training run: `python train.py` in its own process group, with an allow-listed
environment and a hard timeout, its output in a log, judged by its summary block.
"""

import math
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from autoresearch.records import write_atomic

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
# Execs argv[2:] once the kernel is asked to SIGKILL it when its parent (pid argv[1]) dies
# (PR_SET_PDEATHSIG = 1, SIGKILL = 9): a Ray task's training must not outlive the worker that
# Ray kills to cancel it, or it holds the node's GPU. (bubblewrap's --die-with-parent does this
# in the sandbox.)
DIE_WITH_PARENT = ("import ctypes, os, sys; ctypes.CDLL(None, use_errno=True).prctl(1, 9); "
                   "os.getppid() == int(sys.argv[1]) or os._exit(137); "
                   "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])")


@dataclass
class RunResult:
    """One training run: val_bpb is None when it failed, and failure says why."""
    val_bpb: float | None
    peak_vram_mb: float
    seconds: float
    failure: str


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
    """SIGTERM the whole process group, then SIGKILL whatever is left (grandchildren too)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=KILL_GRACE_S)
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
            os.killpg(pid, signal.SIGKILL)
    except (OSError, ProcessLookupError):
        pass  # already gone
    pid_file.unlink()


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
    if not VAL_BPB_RANGE[0] < val_bpb < VAL_BPB_RANGE[1]:
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
                 extra_env=None, readable=(), die_with_parent=False):
    """Run `python train.py` in `repo` (a slot's worktree) time-boxed, with `extra_env` (e.g. the
    slot's CUDA_VISIBLE_DEVICES), in the sandbox when there is one (`readable` read-only, e.g. the
    user's checkout that holds the worktree's git data; writable: only the run's own directory,
    $AUTORESEARCH_RUN_DIR beside its log, and the compile cache), and judge its summary. With
    die_with_parent it is killed when this process dies (a Ray worker: no driver cleans up after
    it on its node)."""
    start = time.time()
    files = Path(log_path).with_name(Path(log_path).stem + "-files")  # the run's own directory, for what it writes
    files.mkdir(parents=True, exist_ok=True)
    argv, extra = [sys.executable, "train.py"], {**(extra_env or {}), "AUTORESEARCH_RUN_DIR": str(files)}
    if sandbox and sandbox.bwrap:
        compile_cache = Path(cache_dir) / "torchinductor"
        (compile_cache / "triton-home").mkdir(parents=True, exist_ok=True)
        extra.update(AUTORESEARCH_CACHE=str(cache_dir), TRITON_CACHE_DIR=str(compile_cache / "triton-home"))
        argv = sandbox.wrap(argv, repo, readable=[cache_dir, *readable], writable=[files, compile_cache])
    elif die_with_parent:
        argv = [sys.executable, "-c", DIE_WITH_PARENT, str(os.getpid()), "train.py"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, cwd=repo, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=training_env(seed, pass_env, extra), start_new_session=True)
        write_atomic(pid_file, str(proc.pid))
        timed_out = False
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:  # also on Ctrl-C or SIGTERM: never leave a training group behind
            kill_group(proc)
            pid_file.unlink(missing_ok=True)
    seconds = time.time() - start
    log_text = Path(log_path).read_text(errors="replace")
    if timed_out:
        failure = f"timed out after {timeout_s:.0f} s (the whole process group was killed)"
    else:
        failure = summary_failure(log_text, proc.returncode, settings, seed)
    if failure:
        return RunResult(None, 0.0, seconds, failure)
    summary = parse_summary(summary_blocks(log_text)[0])
    vram_mb = number(summary.get("peak_vram_mb"))
    return RunResult(float(summary["val_bpb"]), vram_mb if math.isfinite(vram_mb) else 0.0, seconds, "")
