"""The sandbox around every training run: bubblewrap (bwrap), where it is installed and works.

train.py is written by an LLM and runs unattended. Inside the sandbox it has its own PID
namespace (it cannot see or signal the driver, or read its environment through /proc), no
capabilities (also when the driver runs as root: it cannot remount, mount or unmount anything,
nor enter another namespace), no network unless --allow-network, a /tmp of its own, empty home
folders ($HOME, /root, /home: no keys, tokens or shell history) but for what it needs in them, an
empty /run (no service's socket: Docker's or systemd's would take root out of any sandbox), and
a read-only view of the rest of the file system except the experiment's own run directory and its
own copy of the compile cache; the validation data and the night's logs are not there at all.
What CUDA needs stays available: the /dev/nvidia* (and /dev/dri) device nodes are bound in, the driver's libraries,
/sys and /proc/driver/nvidia are readable. Paths under /tmp that the run reads (the repository,
the prepared data, the Python environment) are bound back in read-only.
"""

import glob
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

BWRAP = "bwrap"
PROBE_TIMEOUT_S = 30.0
INSTALL_HINT = "install bubblewrap (apt install bubblewrap, dnf install bubblewrap)"
DEVICE_GLOBS = ("/dev/nvidia*", "/dev/nvidia-caps", "/dev/dri", "/dev/dxg")


@dataclass
class Sandbox:
    """How training runs: in bubblewrap (`bwrap` is its path) or not (bwrap is None)."""
    bwrap: str | None
    allow_network: bool = False

    def describe(self):
        if not self.bwrap:
            return "off"
        return "bubblewrap" + (", network allowed" if self.allow_network else ", no network")

    def wrap(self, argv, cwd, readable=(), writable=(), hidden=(), tmp=None):
        """argv run inside the sandbox (unchanged when it is off), with no capabilities (root's too): cwd
        and `readable` read-only; `hidden` files and folders empty (the validation data, the night's
        logs; cwd stays visible); `writable` (each existing, a path or a (source, where) pair) writable;
        `tmp` (a folder) its /tmp, else an empty tmpfs. Home folders are empty and read-only but for
        what the run needs in them (cwd, `readable`, Python and its packages)."""
        if not self.bwrap:
            return list(argv)
        args = [self.bwrap, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc",
                *(["--bind", str(tmp), "/tmp"] if tmp else ["--tmpfs", "/tmp"]),
                "--unshare-pid", "--unshare-ipc", "--die-with-parent", "--cap-drop", "ALL"]
        if not self.allow_network:
            args.append("--unshare-net")
        for device in sorted({d for pattern in DEVICE_GLOBS for d in glob.glob(pattern)}):
            args += ["--dev-bind", device, device]
        needed = [str(Path(p).resolve()) for p in [cwd, *readable, *python_paths()] if p]
        emptied = [h for h in home_folders() + run_folders() if not Path(h).is_relative_to("/tmp")
                   and not any(Path(h).is_relative_to(p) for p in needed)]
        for folder in emptied:
            args += ["--tmpfs", folder]
        for path in inside(needed + kept_in_run(), ["/tmp", *emptied]):
            args += ["--ro-bind", path, path]
        for folder in emptied:
            args += ["--remount-ro", folder]
        hidden = sorted({str(p) for p in hidden if Path(p).exists()})
        for path in hidden:
            args += ["--tmpfs", path] if Path(path).is_dir() else ["--ro-bind", "/dev/null", path]
        if hidden:
            args += ["--ro-bind", str(cwd), str(cwd)]
        for path in writable:
            source, where = path if isinstance(path, tuple) else (path, path)
            args += ["--bind", str(source), str(where)]
        for path in hidden:  # (once what is bound inside exists)
            args += ["--remount-ro", path] if Path(path).is_dir() else []
        return args + ["--chdir", str(cwd), "--", *argv]


def python_paths():
    """Where this Python, its packages and the libraries it loads live (train.py runs with the same
    interpreter)."""
    return [sys.prefix, sys.base_prefix, os.path.dirname(os.path.realpath(sys.executable)),
            os.path.dirname(sys.executable), *sys.path, *os.environ.get("PYTHONPATH", "").split(os.pathsep),
            *os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep)]


def home_folders():
    """The folders that hold people's files (keys, tokens, shell history): $HOME, /root and /home,
    where they exist and are not the whole file system."""
    found = {str(Path(p).resolve()) for p in (os.environ.get("HOME", ""), "/root", "/home") if p and Path(p).is_dir()}
    found = sorted(p for p in found if p != "/")
    return [p for i, p in enumerate(found) if not any(Path(p).is_relative_to(q) for q in found[:i])]


def run_folders():
    """Where services keep their sockets (/run, and /var/run where it is not a link to it): the
    Docker and systemd sockets there would take root out of any sandbox."""
    return [p for p in ("/run", "/var/run") if Path(p).is_dir() and not Path(p).is_symlink()]


def kept_in_run():
    """What a run needs of /run, bound back read-only: the NVIDIA persistence daemon's folder (CUDA
    asks it), and the folder of /etc/resolv.conf's target (systemd-resolved's stub), so that a run
    allowed the network still resolves names."""
    resolver = Path("/etc/resolv.conf").resolve().parent
    return [str(p) for p in (Path("/run/nvidia-persistenced"), resolver) if p.is_dir() and p != Path("/")]


def inside(paths, roots):
    """The existing directories among `paths` that lie in one of `roots` (which the sandbox replaces
    with empty ones), outermost first and without those inside another (binding those is enough)."""
    found = sorted({str(Path(p).resolve()) for p in paths if p and Path(p).is_dir()
                    and any(Path(p).resolve().is_relative_to(r) for r in roots)})
    found = [p for p in found if p not in roots]
    return [p for i, p in enumerate(found) if not any(Path(p).is_relative_to(q) for q in found[:i])]


def choose(mode, allow_network, cwd, cuda=False):
    """The sandbox for --sandbox auto|on|off: a trivial command run inside decides whether it works
    (a kernel without unprivileged user namespaces, a container that forbids them; with `cuda`, a
    GPU that is not visible inside); `on` refuses to start without it, `auto` says so in one line
    and runs unsandboxed."""
    if mode == "off":
        return Sandbox(None)
    bwrap = shutil.which(BWRAP)
    problem = probe(Sandbox(bwrap, allow_network), cwd, cuda) if bwrap else f"{BWRAP} is not installed"
    if not problem:
        return Sandbox(bwrap, allow_network)
    if mode == "on":
        raise SystemExit(f"autoresearch: --sandbox on, but the sandbox does not work here: {problem}; "
                         f"{INSTALL_HINT}, or pass --sandbox off")
    print(f"note: training runs are NOT sandboxed ({problem}); {INSTALL_HINT} to sandbox them", flush=True)
    return Sandbox(None)


def probe(sandbox, cwd, cuda=False):
    """Why the sandbox cannot run a Python one-liner here (with `cuda`: one that finds the GPU
    through torch); "" when it can."""
    with tempfile.TemporaryDirectory(prefix="autoresearch-probe-") as scratch:
        check = "import torch; torch.zeros(1, device='cuda').sum().item(); " if cuda else ""  # a CUDA context
        argv = [sys.executable, "-c", check + f"open({os.path.join(scratch, 'ok')!r}, 'w').write('ok')"]
        try:
            proc = subprocess.run(sandbox.wrap(argv, cwd, writable=[scratch]), capture_output=True, text=True,
                                  timeout=PROBE_TIMEOUT_S, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as error:
            return f"{BWRAP} could not be run: {error}"
        if proc.returncode != 0 or not os.path.exists(os.path.join(scratch, "ok")):
            last = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
            return f"{BWRAP} failed: {last}"
    return ""
