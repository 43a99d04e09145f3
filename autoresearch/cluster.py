"""Past one box: training runs as Ray tasks that ask Ray for one GPU each (Ray schedules them;
we write no scheduler). The driver, on the head node, stays the only writer of git, the journal
and results.tsv: a task gets train.py's text and returns its result, its log and the metric
hashes of the node it ran on, and a node whose prepare.py or prepared data differ is refused.

A node needs the project at the same path as on the head node (for prepare.py) and the prepared
data under the same AUTORESEARCH_CACHE (shared storage, or `python prepare.py` on each node).
"""

import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from autoresearch import scoring, training

LOG_BYTES = 4 << 20                # the end of a run's log that comes back from its node (a log can be any size)


@dataclass
class RayRunner:
    """Runs train.py as Ray tasks on the cluster the driver is connected to."""
    project: str                   # the repository, at the same path on every node
    gpus: int                      # GPUs in the cluster: one slot each
    in_flight: set = field(default_factory=set)

    def run(self, source, ctx, night, seed, log_path, check_below=float("inf"), fill_cache=False, retry_until=None):
        """One run as a Ray task of one GPU; blocks until it ends (in a slot's thread). A task that
        fails (a lost node, a killed worker) is a failed run, not the end of the night."""
        import ray
        env = {k: v for k, v in os.environ.items() if k.startswith("AUTORESEARCH_")}
        task = ray.remote(num_gpus=1, max_retries=0)(train_on_node)
        start = time.time()
        ref = task.remote(source, self.project, seed, ctx.timeout_s, night.settings, env, ctx.pass_env,
                          getattr(ctx.sandbox, "allow_network", None) if getattr(ctx.sandbox, "bwrap", None) else None,
                          check_below, fill_cache, ctx.limits, retry_until)
        self.in_flight.add(ref)
        try:
            result, log_text, hashes, node = ray.get(ref)
        except ray.exceptions.RayError as error:
            Path(log_path).write_text(f"{type(error).__name__}: {error}\n")
            return training.RunResult(None, 0.0, time.time() - start,
                                      f"the Ray task failed: {type(error).__name__}: {first_line(error)}")
        finally:
            self.in_flight.discard(ref)
        Path(log_path).write_text(log_text)
        if hashes != night.metric_hashes:
            return training.RunResult(None, 0.0, result.seconds, (
                f"refused: node {node} has another prepare.py or other prepared data than the run started "
                "with (metric hashes differ); prepare every node the same way, under the same AUTORESEARCH_CACHE"))
        return result

    def cancel_all(self):
        """End the tasks still running (the driver stops): Ray kills their workers, and the kernel
        their training (its supervisor's parent-death signal)."""
        import ray
        for ref in list(self.in_flight):
            ray.cancel(ref, force=True)


def first_line(error):
    """An error's first line, shortened (a cancelled task's error has no text)."""
    return (str(error).splitlines() or ["(no message)"])[0][:200]


def connect(address, project):
    """Join the Ray cluster at `address` ("auto": the one running here); one slot per GPU in it."""
    try:
        import ray
    except ImportError:
        raise SystemExit("autoresearch: --ray needs Ray: pip install -e '.[ray]'")
    ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus == 0:
        raise SystemExit(f"autoresearch: the Ray cluster at {address!r} has no GPU; start its nodes with their GPUs")
    print(f"Ray cluster {address}: {gpus} GPU(s), one training slot each", flush=True)
    return RayRunner(str(project), gpus)


def train_on_node(source, project, seed, timeout_s, settings, env, pass_env, sandboxed_network=None,
                  check_below=float("inf"), fill_cache=False, limits=None, retry_until=None):
    """A Ray task: train.py (its text) beside the node's prepare.py in a scratch directory, trained
    once (in the node's bubblewrap when the driver sandboxes: sandboxed_network is then whether the
    network is allowed) and scored and checked on the node by the driver's code (trusted, outside the
    sandbox); returns (RunResult, the log, the node's metric hashes, the node's name)."""
    from autoresearch import records, sandbox  # on the node
    work = Path(tempfile.mkdtemp(prefix="autoresearch-run-"))
    try:
        shutil.copy(Path(project) / "prepare.py", work / "prepare.py")
        (work / "train.py").write_text(source)
        previous = {k: os.environ.get(k) for k in env}
        os.environ.update(env)  # the node's prepare.py reads AUTORESEARCH_* when loaded
        try:
            prepare = training.load_prepare(work)
            hashes = records.metric_hashes(work, prepare)
        finally:
            for k, v in previous.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        box = None
        if sandboxed_network is not None:
            box = sandbox.choose("on", sandboxed_network, work)  # refuses, with the reason, where it cannot
        result = training.run_training(work, work / "train.log", seed, timeout_s, settings, work / "train.pid",
                                       pass_env, box, env.get("AUTORESEARCH_CACHE") or prepare.CACHE_DIR,
                                       extra_env=env, prepare=prepare,
                                       check_below=check_below, fill_cache=fill_cache, limits=limits,
                                       retry_until=retry_until)
        return result, records.read_tail(work / "train.log", LOG_BYTES), hashes, socket.gethostname()
    finally:
        scoring.remove(work)
