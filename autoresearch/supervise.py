"""The supervisor of one training run (or its check): it starts the command and stays its parent
until every process the command started is gone, and it holds the run to its limits.

    python supervise.py LIMITS_JSON -- argv...

- Every descendant ends with the run: this process is a child subreaper, so a grandchild that
  called setsid() (or was orphaned) stays below it and is killed at the end, whatever session or
  process group it moved to. Where a pids cgroup can be made (root, cgroup v2 or v1's pids
  hierarchy), the run is in one of its own, which also caps its tasks.
- Limits (LIMITS_JSON): `file` bytes per file (RLIMIT_FSIZE: the kernel stops the write), `written`
  bytes on disk in the `watch` folders together (the run directory and its /tmp), `output` bytes
  of the `log`, `processes` at once, and `tasks` (threads too) as a hard ceiling (the cgroup, or
  RLIMIT_NPROC above what the user already runs; root without a cgroup has only the count).
  A run that goes past one is killed, and the reason goes to `report`, a file the run cannot see.
- SIGTERM (the driver stopping it) is passed on to every descendant; what is left after `grace_s`
  is killed. With `parent`, the driver's death is a SIGTERM too (a Ray worker killed to cancel a task).

Standard library only: it runs as a script, before anything of the package is imported.
"""

import ctypes
import json
import os
import resource
import select
import signal
import sys
import time

PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER = 1, 36
POLL_S = 0.1                       # how often processes and the log's bytes are counted
WALK_S = 1.0                       # how often the bytes on disk are (a walk of the run's folders)
CGROUP_ROOTS = ("/sys/fs/cgroup", "/sys/fs/cgroup/pids")  # cgroup v2, v1's pids hierarchy
EXIT_LIMIT = 125                   # the exit code of a run stopped at a limit (the reason is in the report)

terminating = []                   # set by SIGTERM


def main(limits, argv):
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    if limits.get("parent"):
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != limits["parent"]:  # the parent died before the line above
            return 137
    signal.signal(signal.SIGTERM, lambda *_: terminating.append(True))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits["file"], limits["file"]))
    cgroup = join_cgroup(limits["tasks"])
    if not cgroup and os.geteuid() != 0:
        ceiling = user_tasks() + limits["tasks"]
        hard = resource.getrlimit(resource.RLIMIT_NPROC)[1]
        resource.setrlimit(resource.RLIMIT_NPROC, (min(ceiling, hard) if hard >= 0 else ceiling, hard))
    child = os.fork()
    if child == 0:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        try:
            os.execvp(argv[0], argv)
        finally:
            os._exit(127)
    status, why, last_walk, exited = None, "", 0.0, child_exit(child)
    try:
        while status is None and not terminating and not why:
            exited(POLL_S)
            status = reap(child)
            walk = time.monotonic() - last_walk >= WALK_S
            if status is None:
                why = over_limit(limits, cgroup, walk)
            last_walk = time.monotonic() if walk else last_walk
        if terminating and status is None:
            signal_all(signal.SIGTERM, cgroup)
            deadline = time.monotonic() + limits.get("grace_s", 10.0)
            while status is None and time.monotonic() < deadline:
                time.sleep(0.05)
                status = reap(child)
        why = why or after_exit(limits, cgroup, status)
    finally:
        end_all(cgroup)
        status = status if status is not None else reap(child, block=True)
        leave_cgroup(cgroup)
    if why:
        with open(limits["report"], "w") as report:
            report.write(why)
        print(f"\nautoresearch: the run was stopped: {why}", file=sys.stderr, flush=True)
        return EXIT_LIMIT
    if status is None or os.WIFSIGNALED(status):
        return 128 + (os.WTERMSIG(status) if status is not None else signal.SIGKILL)
    return os.WEXITSTATUS(status)


def child_exit(child):
    """wait(seconds): returns after that long, or as soon as the child exits (a pidfd, Linux 5.3+)."""
    try:
        pidfd = os.pidfd_open(child)
    except (AttributeError, OSError):
        return time.sleep
    return lambda seconds: select.select([pidfd], [], [], seconds)


def reap(child, block=False):
    """Collect every exited descendant (orphans come to this process); the child's wait status
    once it has exited, else None."""
    status = None
    while True:
        try:
            pid, code = os.waitpid(-1, 0 if block else os.WNOHANG)
        except ChildProcessError:
            return status
        if pid == 0:
            return status
        if pid == child:
            status, block = code, False


def over_limit(limits, cgroup, walk):
    """Why the run must stop now ("" while it is within its limits); `walk`: count the bytes on disk."""
    if len(descendants()) > limits["processes"]:
        return f"it ran more than {limits['processes']:,} processes at once (the limit on processes)"
    if cgroup and tasks_refused(cgroup):
        return f"it tried to run more than {limits['tasks']:,} processes and threads (the limit on tasks)"
    if size(limits.get("log")) > limits["output"]:
        return f"it printed more than {human(limits['output'])} (the limit on output)"
    if walk:
        written = sum(disk_bytes(folder) for folder in limits.get("watch", ()))
        if written > limits["written"]:
            return (f"it wrote more than {human(limits['written'])} into its run directory and /tmp "
                    "(the limit on bytes written)")
    return ""


def after_exit(limits, cgroup, status):
    """A limit the kernel enforced, seen once the run has ended ("" if none): a write past the file
    size (SIGXFSZ kills, or a Python that ignores it gets EFBIG: a file left at the limit), a fork
    past the cgroup's tasks."""
    killed = status is not None and os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGXFSZ
    if killed or largest_file([limits.get("log"), *limits.get("watch", ())]) >= limits["file"]:
        return f"it wrote a file of {human(limits['file'])} or more (the limit on a file's size)"
    if cgroup and tasks_refused(cgroup):
        return f"it tried to run more than {limits['tasks']:,} processes and threads (the limit on tasks)"
    return ""


def human(n):
    """Bytes as the largest unit that keeps the number at 1 or more: 16 GiB, 512 MiB."""
    for shift, unit in ((30, "GiB"), (20, "MiB"), (10, "KiB")):
        if n >= 1 << shift:
            return f"{n / (1 << shift):g} {unit}"
    return f"{n} bytes"


def size(path):
    try:
        return os.stat(path).st_size if path else 0
    except OSError:
        return 0


def largest_file(paths):
    """The size of the largest file among `paths` and in the folders among them."""
    largest = 0
    for path in filter(None, paths):
        for root, _, files in os.walk(path) if os.path.isdir(path) else [("", [], [path])]:
            largest = max([largest] + [size(os.path.join(root, name)) for name in files])
    return largest


def disk_bytes(folder):
    """Bytes on disk under `folder` (a sparse file counts what it holds, not its length)."""
    total = 0
    for root, dirs, files in os.walk(folder):
        for name in files + dirs:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                pass
    return total


def children_by_parent():
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    ppid = int(f.read().rsplit(b")", 1)[1].split()[1])  # (the name may hold spaces and brackets)
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    return children


def descendants():
    """Every process below this one (an orphan of the run is re-parented here: none escapes)."""
    children, found, todo = children_by_parent(), [], [os.getpid()]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def signal_all(signum, cgroup):
    for pid in set(descendants()) | set(cgroup_pids(cgroup)):
        try:
            os.kill(pid, signum)
        except OSError:
            pass


def end_all(cgroup):
    """SIGKILL every descendant until none is left (a process forking as it is killed included)."""
    if cgroup and os.path.exists(f"{cgroup}/cgroup.kill"):
        write(f"{cgroup}/cgroup.kill", "1")
    for _ in range(10000):
        pids = set(descendants()) | set(cgroup_pids(cgroup))
        if not pids:
            return
        signal_all(signal.SIGKILL, cgroup)
        reap(None)
        time.sleep(0.01)


# ---------------------------------------------------------------------------
# A pids cgroup of the run's own, where this process may make one
# ---------------------------------------------------------------------------

def join_cgroup(tasks):
    """A new pids cgroup holding this process (and so everything it starts), capped at `tasks`;
    None where none can be made (no root, no pids controller, a read-only /sys/fs/cgroup)."""
    for root in CGROUP_ROOTS:
        v2 = os.path.exists(f"{root}/cgroup.controllers")
        if v2 and "pids" not in read(f"{root}/cgroup.subtree_control").split():
            continue
        if not v2 and not os.path.exists(f"{root}/tasks"):
            continue
        remove_stale_cgroups(root)
        path = f"{root}/autoresearch-{os.getpid()}"
        try:
            os.mkdir(path)
            write(f"{path}/pids.max", str(tasks))
            write(f"{path}/cgroup.procs", str(os.getpid()))
            return path
        except OSError:
            try:
                os.rmdir(path)
            except OSError:
                pass
    return None


def leave_cgroup(cgroup):
    if cgroup:
        try:
            write(f"{os.path.dirname(cgroup)}/cgroup.procs", str(os.getpid()))
            os.rmdir(cgroup)
        except OSError:
            pass


def remove_stale_cgroups(root):
    """The cgroups of supervisors that were killed (empty now; a live one's stays)."""
    for name in os.listdir(root):
        pid = name.removeprefix("autoresearch-")
        if name.startswith("autoresearch-") and pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            try:
                os.rmdir(f"{root}/{name}")
            except OSError:
                pass


def tasks_refused(cgroup):
    """Whether the cgroup refused a fork at its pids.max."""
    for line in read(f"{cgroup}/pids.events").splitlines():
        key, _, value = line.partition(" ")
        if key == "max" and value.strip() not in ("", "0"):
            return True
    return False


def cgroup_pids(cgroup):
    if not cgroup:
        return []
    return [int(p) for p in read(f"{cgroup}/cgroup.procs").split() if int(p) != os.getpid()]


def user_tasks():
    """Processes and threads this user runs now (RLIMIT_NPROC counts them all)."""
    count = 0
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and os.stat(f"/proc/{entry}").st_uid == os.getuid():
                count += len(os.listdir(f"/proc/{entry}/task"))
        except OSError:
            pass
    return count


def read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def write(path, text):
    with open(path, "w") as f:
        f.write(text)


if __name__ == "__main__":
    sys.exit(main(json.loads(sys.argv[1]), sys.argv[3:] if sys.argv[2:3] == ["--"] else sys.argv[2:]))
