"""Stand-in train.py: prints the summary block of the real one without training.

val_bpb = TRUE_BPB (the "true value" of this code) + NOISE_STD * a draw seeded by
AUTORESEARCH_SEED. MODE selects a failure. Tests' scripted LLM edits change these lines.
"""
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import prepare

TRUE_BPB = 1.000000
NOISE_STD = 0.0
DATA_ORDER = 0
MODE = "ok"
SLEEP_S = 0.0
BONUS = 0.0
seed = int(os.environ.get("AUTORESEARCH_SEED", "42"))


class OutOfMemoryError(RuntimeError):  # (its traceback's last line reads as torch's)
    __module__ = "torch"


print("env: " + json.dumps(sorted(os.environ)), flush=True)
print("gpu: " + os.environ.get("CUDA_VISIBLE_DEVICES", "-"), flush=True)
if os.environ.get("STANDIN_PID_FILE"):
    Path(os.environ["STANDIN_PID_FILE"]).write_text(str(os.getpid()))
if MODE == "crash":
    raise RuntimeError("stand-in crash: CUDA out of memory")
if MODE in ("oom", "oom_always", "oom_in_scoring"):  # fitted to 64 rows (or the driver's cap)
    rows = min(64, int(os.environ.get("AUTORESEARCH_DEVICE_BATCH", 64)))
    print(f"fit: stand-in GPU, 1.0 GiB free: device batch {rows} rows, {256 // rows} accumulation steps", flush=True)
    stash = Path(os.environ["AUTORESEARCH_RUN_DIR"]) / "stash.bin"  # what a first try could leave its second
    print(f"stash from an earlier try: {stash.exists()}", flush=True)
    stash.write_bytes(b"validation rows")
    if MODE == "oom_always" or MODE == "oom" and rows > 32:  # (above 32 rows, or always: out of memory)
        raise OutOfMemoryError(f"CUDA out of memory. Tried to allocate {rows * 64} MiB")
if MODE == "nofit":  # prepare.fit_device_batch's refusal
    raise SystemExit("error: the model does not fit the stand-in GPU: even a device batch of 1 row needs about 90.0 "
                     "GiB by train.py's estimate, and 20.2 of 23.6 GiB free may be used; shorten the rows "
                     "(AUTORESEARCH_MAX_SEQ_LEN, now 2048) or shrink the model (DEPTH)")
if MODE == "flaky" and seed == 45:  # one seed's run crashes, the others train
    raise RuntimeError("stand-in crash on seed 45")
if MODE == "nan":
    print("FAIL")
    sys.exit(1)
if MODE == "nometric":
    print("finished, but no summary")
    sys.exit(0)
if MODE == "hang":  # a grandchild that ignores SIGTERM, then sleep past any timeout
    child = subprocess.Popen([sys.executable, "-c", "import signal, time; "
                              "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
    Path(os.environ["STANDIN_GRANDCHILD_FILE"]).write_text(str(child.pid))
    time.sleep(600)
if MODE == "setsid_grandchild":  # a daemon in a session of its own; train.py itself goes on and ends
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    Path(os.environ["STANDIN_GRANDCHILD_FILE"]).write_text(str(child.pid))
if MODE == "write_big":  # fills its run directory (or /tmp), then trains on
    with open(Path(os.environ.get("STANDIN_WRITE_DIR") or os.environ["AUTORESEARCH_RUN_DIR"]) / "big.bin", "wb") as f:
        for _ in range(8):
            f.write(os.urandom(1 << 20))
    time.sleep(3)
if MODE == "flood":  # one endless line
    while True:
        sys.stdout.write("x" * (1 << 20))
if MODE == "spawn":  # many processes at once
    children = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"]) for _ in range(40)]
    time.sleep(3)
if MODE == "long_line_crash":  # a line of 8 MiB, a secret it read, then a crash
    print("y" * (8 << 20), flush=True)
    print(f"read: {os.environ.get('STANDIN_SECRET_TEXT', '')}", flush=True)
    raise RuntimeError("stand-in crash after a long line")
if MODE == "slow_once" and not Path(os.environ["STANDIN_ONCE_FILE"]).exists():
    Path(os.environ["STANDIN_ONCE_FILE"]).write_text("x")
    time.sleep(600)
if MODE == "touch_data":
    with open(prepare.CACHE_DIR / "val.bin", "ab") as f:
        f.write(b"moved the metric")
if MODE == "touch_prepare":
    with open("prepare.py", "a") as f:
        f.write("# EVAL_TOKENS changed by train.py\n")
if MODE == "wrong_seed":
    seed += 1
# the user's checkout, where the driver keeps results.tsv and its branch (train.py runs in a worktree)
MAIN = Path(subprocess.run(["git", "rev-parse", "--path-format=absolute", "--git-common-dir"], capture_output=True,
                           text=True).stdout.strip()).parent
if MODE == "probe_sandbox":  # what a careless train.py could reach, each attempt reported
    import ctypes
    import socket

    libc = ctypes.CDLL(None, use_errno=True)
    MS_REMOUNT, MS_BIND, MNT_DETACH = 32, 4096, 2
    RAN = MAIN / "planted-command-ran"

    def can(action):
        try:
            action()
            return True
        except OSError:
            return False

    def proc_environs():
        for environ in Path("/proc").glob("[0-9]*/environ"):
            try:
                yield environ.read_bytes()
            except OSError:
                continue
    own_dir = Path(os.readlink("/proc/self/fd/1")).parent  # stdout is the run's log
    needle = "sk-ant-test-secret"  # the driver's ANTHROPIC_API_KEY in the tests
    found = {
        "secret_in_env": any(needle in v for v in os.environ.values()),
        "secret_in_proc": any(needle.encode() in e for e in proc_environs()),
        "write_results_tsv": can(lambda: open(MAIN / "results.tsv", "a").close()),
        "write_journal": can(lambda: open(MAIN / "runs/t/journal.json", "a").close()),
        "write_git": can(lambda: (Path(MAIN / ".git/probe").write_text("x"), Path(MAIN / ".git/probe").unlink())),
        "write_prepare_py": can(lambda: open(MAIN / "prepare.py", "a").close()),
        "write_tokens": can(lambda: open(prepare.CACHE_DIR / "val.bin", "a").close()),
        "write_experiment_dir": can(lambda: (own_dir / "probe.txt").write_text("x")),
        "write_run_dir": can(lambda: (Path(os.environ["AUTORESEARCH_RUN_DIR"]) / "probe.txt").write_text("x")),
        "write_compile_cache": can(lambda: (prepare.CACHE_DIR / "torchinductor" / "probe").write_text("x")),
        "read_val": can(lambda: (prepare.CACHE_DIR / "val.bin").read_bytes() == b"validation tokens" or 1 / 0),
        "read_logs": can(lambda: (MAIN / "runs/t/0000/train.log").read_text()),
        "remount_root": subprocess.run(["mount", "-o", "remount,rw,bind", "/"], capture_output=True).returncode == 0,
        "tcp_loopback": can(lambda: socket.create_connection(("127.0.0.1", int(os.environ["STANDIN_PORT"])), 2)),
        "write_program_md": can(lambda: open(MAIN / "program.md", "a").close()),
        # a hook and a config command for the driver's next git command, run outside any sandbox
        "write_git_hook": can(lambda: (MAIN / ".git/hooks/post-checkout").write_text(f"#!/bin/sh\ntouch {RAN}\n")
                              or os.chmod(MAIN / ".git/hooks/post-checkout", 0o755)),
        "write_git_config": subprocess.run(["git", "-C", str(MAIN), "config", "core.fsmonitor", f"touch {RAN};:"],
                                           capture_output=True).returncode == 0,
        "read_home": can(lambda: Path(os.environ.get("STANDIN_HOME_SECRET", "/nonexistent")).read_text()),
        # a service's socket in /run (Docker's, systemd's would take root out of any sandbox)
        "connect_run_socket": can(lambda: socket.socket(socket.AF_UNIX).connect(
            os.environ.get("STANDIN_RUN_SOCKET", "/nonexistent"))),
    }
    if os.environ.get("STANDIN_SANDBOXED"):  # what root could do with its capabilities (only tried in a
        found.update({                     # sandbox: outside one they would change this machine)
            "remount_root_libc": libc.mount(b"none", b"/", None, MS_REMOUNT | MS_BIND, None) == 0,
            "umount_proc": libc.umount2(b"/proc", MNT_DETACH) == 0,  # (the host's /proc lies beneath)
            "mount_proc": libc.mount(b"proc", os.environ["TMPDIR"].encode(), b"proc", 0, None) == 0,
            "setns_net": libc.setns(os.open("/proc/self/ns/net", os.O_RDONLY), 0) == 0})
    print("sandbox-probe: " + json.dumps(found), flush=True)
if MODE == "touch_main_prepare":  # the metric in the user's checkout (which every run shares)
    with open(MAIN / "prepare.py", "a") as f:
        f.write("# EVAL_TOKENS changed by train.py\n")
if MODE == "write_tsv":  # a row of its own in the driver's results.tsv
    with open(MAIN / "results.tsv", "a") as f:
        f.write("deadbee\t0.100000\t1.0\tkeep\ta row train.py wrote\n")
if MODE == "write_tsv_no_newline":
    with open(MAIN / "results.tsv", "a") as f:
        f.write("deadbee\t0.100000\t1.0\tkeep\ta row train.py wrote")
if MODE == "delete_tsv":
    os.remove(MAIN / "results.tsv")
if MODE == "git_checkout":  # moves the user's checkout off the driver's branch
    subprocess.run(["git", "-C", str(MAIN), "checkout", "-q", "master"], check=True)
if MODE == "git_checkout_worktree":  # moves its own worktree onto a branch
    subprocess.run(["git", "checkout", "-q", "-b", "train-py-was-here"], check=True)
if MODE == "fill_cache":  # what a compile leaves in the cache
    (prepare.CACHE_DIR / "torchinductor" / "kernel-baseline.py").write_text("# compiled")
if MODE == "poison_cache":  # code a later run would load from the cache
    (prepare.CACHE_DIR / "torchinductor" / "kernel-baseline.py").write_text("CHEAT = True")
    (prepare.CACHE_DIR / "torchinductor" / "poison.py").write_text("CHEAT = True")
if MODE == "read_cache":
    cache = prepare.CACHE_DIR / "torchinductor"
    print("cache: " + json.dumps({f.name: f.read_text() for f in sorted(cache.glob("*.py"))}), flush=True)
started = time.time()
time.sleep(SLEEP_S)  # "training"
for step in range(5):  # progress lines as train.py prints them (the night's page draws the loss curve)
    print(f"\rstep {step:05d} ({20.0 * step:.1f}%) | loss: {TRUE_BPB * (5 - step):.6f} | lrm: 1.00 | dt: 10ms", end="")
print()
print(f"trained from {started} to {time.time()}", flush=True)
val_bpb = TRUE_BPB - BONUS + NOISE_STD * random.Random(f"{seed}:{DATA_ORDER}").gauss(0, 1)
if MODE == "negative":
    val_bpb = -0.5
model = prepare.ConstantModel(round(val_bpb, 6))  # (results.tsv's digits: sigma from rows = the journal's)
if MODE == "oom_in_scoring":  # out of memory once its scoring began (validation inputs seen)
    def logits(x):
        raise OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
    model.logits = logits
if MODE == "cheat":  # claims a lower number than its weights give (as a patched loss would)
    model.logits = lambda x, honest=model.logits: prepare.ConstantModel(val_bpb - 0.3).logits(x)
if MODE == "echo_inputs":  # prints what it is scored on
    model.logits = lambda x, honest=model.logits: print(f"scored on {x.tolist()}", flush=True) or honest(x)
if MODE == "fake_summary":  # prints a summary without having its model scored
    val_bpb -= 0.5
else:
    val_bpb = prepare.evaluate_bpb(model, None, 4)
time_budget = prepare.TIME_BUDGET * (2 if MODE == "settings" else 1)
if MODE == "two_blocks":  # an earlier block, then a second with a much lower val_bpb
    print(f"---\nval_bpb:          {val_bpb:.6f}\nseed:             {seed}")
    val_bpb -= 0.5
print("---")
print(f"val_bpb:          {val_bpb:.6f}")
print("training_seconds: 1.0")
print("total_seconds:    1.1")
print("peak_vram_mb:     2048.0")
print("mfu_percent:      0.00")
print("total_tokens_M:   0.1")
print("num_steps:        3")
print("num_params_M:     0.1")
print("depth:            2")
print("tokens_per_sec:   1000")
print(f"seed:             {seed}")
print(f"max_seq_len:      {prepare.MAX_SEQ_LEN}")
print(f"time_budget:      {time_budget}")
print(f"eval_tokens:      {prepare.EVAL_TOKENS}")
if MODE == "exit_after":  # a summary, then a failure
    sys.exit(3)
