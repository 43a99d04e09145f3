"""The supervisor of one training run (or its check): it starts the command and stays its parent
until every process the command started is gone, and it holds the run to its limits.

    python supervise.py LIMITS_JSON -- argv...

- Every descendant ends with the run: this process is a child subreaper, so a grandchild that
  called setsid() (or was orphaned) stays below it and is killed at the end, whatever session or
  process group it moved to. Where a pids cgroup can be made below this process's own (cgroup v1's
  pids hierarchy; v2 only at its root, never taking a run out of a service's or a job's cgroup),
  the run is in one of its own, which caps its tasks in the kernel.
- Limits (LIMITS_JSON): `file` bytes per file (RLIMIT_FSIZE: the kernel stops the write); `written`
  bytes on disk in the `watch` folders together (the run directory, its /tmp, its socket folder;
  each file or folder counts at least ENTRY_BYTES, so that millions of empty files are no way
  around it); `output` bytes of the `log`; `processes` at once; `tasks`, its processes' threads
  together (also a hard ceiling: the cgroup, or RLIMIT_NPROC above what the user already runs).
  A run that goes past one is killed, and the reason goes to `report`, a file the run cannot see.
- SIGTERM (the driver stopping it) is passed on to every descendant; what is left after `grace_s`
  is killed. The driver's death (`parent`) is a SIGTERM too.

With the sandbox off, train.py runs as the same user beside this process and could stop or kill
it: the limits then hold against accidents, not against a run that sets out to break them.
Standard library only: it runs as a script, before anything of the package is imported.
"""

import ctypes
import json
import os
import resource
import select
import signal
import stat
import sys
import time

PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER = 1, 36
POLL_S = 0.1                       # how often the log's bytes are counted
COUNT_S = 0.25                     # how often processes and threads are
WALK_S = 1.0                       # how often the bytes on disk are, at least (a walk of the run's folders)
ENTRY_BYTES = 4096                 # what a file or folder counts at the least (its inode, a block)
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
    cgroup = make_cgroup(limits["tasks"])
    if not cgroup and os.geteuid() != 0:
        ceiling = user_tasks() + limits["tasks"]
        hard = resource.getrlimit(resource.RLIMIT_NPROC)[1]
        resource.setrlimit(resource.RLIMIT_NPROC, (min(ceiling, hard) if hard >= 0 else ceiling, hard))
    child = os.fork()
    if child == 0:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        try:
            if cgroup:  # the run alone is in it (its cgroup.kill never reaches this process)
                try:
                    write(f"{cgroup}/cgroup.procs", "0")
                except OSError:
                    pass
            os.execvp(argv[0], argv)
        finally:
            os._exit(127)
    status, why, next_walk, next_count, exited = None, "", 0.0, 0.0, child_exit(child)
    try:
        while status is None and not terminating and not why:
            exited(POLL_S)
            status = reap(child)
            if status is not None:
                break
            why = over_output(limits)
            if not why and time.monotonic() >= next_count:
                why, next_count = over_count(limits, cgroup), time.monotonic() + COUNT_S
            if not why and time.monotonic() >= next_walk:
                started = time.monotonic()
                why = over_written(limits)
                next_walk = time.monotonic() + max(WALK_S, 5 * (time.monotonic() - started))  # (big: less often)
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
        remove_cgroup(cgroup)
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


def over_output(limits):
    """Why the run must stop now, by what it printed ("" while it is within the limit)."""
    if size(limits.get("log")) > limits["output"]:
        return f"it printed more than {human(limits['output'])} (the limit on output)"
    return ""


def over_count(limits, cgroup):
    """Why the run must stop now, by its processes or threads ("" while it is within them)."""
    found = descendants()
    if len(found) > limits["processes"]:
        return f"it ran more than {limits['processes']:,} processes at once (the limit on processes)"
    if sum(found.values()) > limits["tasks"] or cgroup and tasks_refused(cgroup):
        return f"it ran more than {limits['tasks']:,} processes and threads (the limit on tasks)"
    return ""


def over_written(limits):
    """Why the run must stop now, by the bytes in its folders ("" while it is within the limit)."""
    written = sum(max(st.st_blocks * 512, ENTRY_BYTES) for folder in limits.get("watch", ()) for st in entries(folder))
    if written > limits["written"]:
        return (f"it wrote more than {human(limits['written'])} into its run directory and /tmp "
                "(the limit on bytes written)")
    return ""


def after_exit(limits, cgroup, status):
    """A limit the kernel enforced, seen once the run has ended ("" if none): a write past the file
    size (SIGXFSZ kills, or a Python that ignores it gets EFBIG: a file left at the limit), a fork
    past the cgroup's tasks."""
    killed = status is not None and os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGXFSZ
    sizes = [st.st_size for folder in limits.get("watch", ()) for st in entries(folder) if stat.S_ISREG(st.st_mode)]
    if killed or max(sizes + [size(limits.get("log"))]) >= limits["file"]:
        return f"it wrote a file of {human(limits['file'])} or more (the limit on a file's size)"
    if cgroup and tasks_refused(cgroup):
        return f"it ran more than {limits['tasks']:,} processes and threads (the limit on tasks)"
    return ""


def human(n):
    """Bytes as the largest unit that keeps the number at 1 or more: 16 GiB, 512 MiB."""
    for shift, unit in ((30, "GiB"), (20, "MiB"), (10, "KiB")):
        if n >= 1 << shift:
            return f"{n / (1 << shift):g} {unit}"
    return f"{n} bytes"


def size(path):
    try:
        return os.lstat(path).st_size if path else 0
    except OSError:
        return 0


def entries(folder):
    """lstat of everything under `folder`, without recursion (a folder 10,000 deep is no error) and
    without following links; a folder its owner made unreadable is made readable first (else what
    it holds would go uncounted, and could not be removed)."""
    stack = [folder]
    while stack and not terminating:
        path = stack.pop()
        try:
            names = os.listdir(path)
        except PermissionError:
            try:
                os.chmod(path, 0o700)
                names = os.listdir(path)
            except OSError:
                continue
        except OSError:
            continue
        for name in names:
            try:
                st = os.lstat(os.path.join(path, name))
            except OSError:
                continue
            yield st
            if stat.S_ISDIR(st.st_mode):
                stack.append(os.path.join(path, name))


def descendants():
    """{pid: threads} of every process below this one (an orphan of the run is re-parented here:
    none escapes), read from each task's children list (or, without it, a scan of /proc)."""
    found, todo = {}, [os.getpid()]
    if not os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children"):
        return scan_descendants()
    while todo:
        pid = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for task in tasks:
            for child in read(f"/proc/{pid}/task/{task}/children").split():
                if int(child) not in found:
                    found[int(child)] = threads(int(child))
                    todo.append(int(child))
    return found


def scan_descendants():
    """descendants() from every process's parent, where the kernel keeps no children lists."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = stat_fields(int(entry))
            if fields:
                children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = {}, [os.getpid()]
    while todo:
        for child in children.get(todo.pop(), []):
            found[child] = threads(child)
            todo.append(child)
    return found


def stat_fields(pid):
    """/proc/<pid>/stat after the process's name (which may hold spaces and brackets): state, ppid, ..."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None


def threads(pid):
    fields = stat_fields(pid)
    return int(fields[17]) if fields and len(fields) > 17 else 1


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
        if not set(descendants()) | set(cgroup_pids(cgroup)):
            return
        signal_all(signal.SIGKILL, cgroup)
        reap(None)
        time.sleep(0.01)


# ---------------------------------------------------------------------------
# A pids cgroup of the run's own, where this process may make one
# ---------------------------------------------------------------------------

def make_cgroup(tasks):
    """A new pids cgroup below this process's own, capped at `tasks`, for the run to join; None
    where none can be made (no root, no pids controller, a read-only /sys/fs/cgroup, a cgroup v2
    that is not the root: there the run would leave its service's or job's limits)."""
    own = {}
    for line in read("/proc/self/cgroup").splitlines():
        _, controllers, path = line.split(":", 2)
        own[controllers] = path
    places = [f"/sys/fs/cgroup/pids{path}" for controllers, path in own.items() if "pids" in controllers.split(",")]
    if own.get("") == "/" and "pids" in read("/sys/fs/cgroup/cgroup.subtree_control").split():
        places.append("/sys/fs/cgroup")
    for parent in places:
        if not os.path.exists(f"{parent}/cgroup.procs"):
            continue
        remove_stale_cgroups(parent)
        path = f"{parent.rstrip('/')}/autoresearch-{os.getpid()}"
        try:
            os.mkdir(path)
            write(f"{path}/pids.max", str(tasks))
            return path
        except OSError:
            remove_cgroup(path)
    return None


def remove_cgroup(cgroup):
    if cgroup:
        try:
            os.rmdir(cgroup)
        except OSError:
            pass


def remove_stale_cgroups(parent):
    """The cgroups of supervisors that were killed (empty now; a live one's stays)."""
    for name in os.listdir(parent):
        pid = name.removeprefix("autoresearch-")
        if name.startswith("autoresearch-") and pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            remove_cgroup(f"{parent}/{name}")


def tasks_refused(cgroup):
    """Whether the cgroup refused a fork at its pids.max."""
    for line in read(f"{cgroup}/pids.events").splitlines():
        key, _, value = line.partition(" ")
        if key == "max" and value.strip() not in ("", "0"):
            return True
    return False


def cgroup_pids(cgroup):
    return [int(p) for p in read(f"{cgroup}/cgroup.procs").split()] if cgroup else []


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
