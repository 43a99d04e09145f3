"""Past one box (issue 10): training runs as Ray tasks on a real local Ray instance (its GPUs
declared, so that tasks of one GPU each schedule on this CPU machine), the driver the only
writer of the records, and a node whose prepare.py differs refused. CI installs Ray (the test
extra) and sets AUTORESEARCH_REQUIRE_RAY=1, so there these tests fail instead of skipping.
Run: python -m pytest tests/test_cluster.py"""

import os
import shutil
import threading
import time

import pytest

from driver_helpers import BASE_LINE, STANDIN_ENV, branch_log, fake, git, journal, pid_gone, repo, rows  # noqa: F401
from fake_anthropic import edit
from autoresearch import cli, cluster, training

try:
    import ray
except ImportError:
    ray = None
needs_ray = pytest.mark.skipif(ray is None and not os.environ.get("AUTORESEARCH_REQUIRE_RAY"),
                               reason="Ray is not installed (pip install -e '.[ray]')")


@pytest.fixture(scope="module")
def ray_instance():
    """A real Ray instance on this machine with two GPUs declared (none are needed: the stand-in
    train.py does not use them). Ray's own clean-up of a killed worker's children is off (older
    Ray has none, and a cluster may turn it off): the driver must not rely on it."""
    os.environ["RAY_kill_child_processes_on_worker_exit"] = "0"  # read by the processes ray.init starts
    try:
        ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
    finally:
        del os.environ["RAY_kill_child_processes_on_worker_exit"]
    yield
    ray.shutdown()


@needs_ray
def test_a_night_on_ray_tasks(repo, fake, ray_instance, capsys):
    fake.replies += [edit("lower", (BASE_LINE, "TRUE_BPB = 0.990000"))]
    assert cli.main(["--tag", "t", "--allow-cpu", "--sandbox", "off", *STANDIN_ENV, "--ray", "auto",
                     "--max-experiments", "1", "--greedy"]) == 0
    out = capsys.readouterr().out
    assert "Ray cluster auto: 2 GPU(s), one training slot each" in out and "2 slot(s) (ray0, ray1)" in out
    assert [(x["description"], x["status"]) for x in rows(repo)] == [("baseline", "keep"), ("lower", "keep")]
    log = (repo / "runs/t/0001/train.log").read_text()  # the node's log, written by the driver
    assert "val_bpb:          0.990000" in log and "gpu: " in log
    assert branch_log(repo) == ["lower", "initial"]
    assert sum(journal(repo)["slot_seconds"].values()) > 0


@needs_ray
def test_a_node_with_another_prepare_py_is_refused(repo, fake, ray_instance, tmp_path):
    """The node's project differs from the head's: the run's metric would not be the run's."""
    assert cli.main(["--tag", "t", "--allow-cpu", "--sandbox", "off", "--max-experiments", "0", "--greedy"]) == 0
    night = cli.records.load_night(repo / "runs/t/journal.json", repo / "results.tsv")
    node = tmp_path / "node"
    shutil.copytree(repo, node, ignore=shutil.ignore_patterns(".git", "runs"))
    (node / "prepare.py").write_text((node / "prepare.py").read_text() + "# another metric\n")

    class Ctx:  # what RayRunner.run reads of the loop's context
        timeout_s, pass_env, sandbox, limits = 60.0, (), None, training.Limits()
    source = git(repo, "show", "HEAD:train.py") + "\n"
    result = cluster.RayRunner(str(node), 2).run(source, Ctx(), night, 42, tmp_path / "train.log")
    assert result.val_bpb is None and result.failure.startswith("refused: node ")
    assert "metric hashes differ" in result.failure and "val_bpb:" in (tmp_path / "train.log").read_text()
    same = cluster.RayRunner(str(repo), 2).run(source, Ctx(), night, 42, tmp_path / "train-2.log")
    assert same == training.RunResult(1.0, 2048.0, same.seconds, "")


@needs_ray
def test_a_cancelled_task_leaves_no_training_on_its_node(repo, fake, ray_instance, tmp_path):
    """The driver stops with a run in flight: Ray kills the task's worker, and the kernel the
    training that worker started (else it would go on holding the node's GPU, unseen by Ray)."""
    assert cli.main(["--tag", "t", "--allow-cpu", "--sandbox", "off", "--max-experiments", "0", "--greedy"]) == 0
    night = cli.records.load_night(repo / "runs/t/journal.json", repo / "results.tsv")
    pid_file = tmp_path / "training.pid"
    source = git(repo, "show", "HEAD:train.py").replace(
        "SLEEP_S = 0.0", f"SLEEP_S = 120.0\nPath({str(pid_file)!r}).write_text(str(os.getpid()))")

    class Ctx:  # what RayRunner.run reads of the loop's context
        timeout_s, pass_env, sandbox, limits = 300.0, (), None, training.Limits()
    runner, results = cluster.RayRunner(str(repo), 2), []
    thread = threading.Thread(target=lambda: results.append(runner.run(source, Ctx(), night, 42, tmp_path / "l")))
    thread.start()
    deadline = time.time() + 60
    while not (pid_file.exists() and pid_file.read_text()) and time.time() < deadline:
        time.sleep(0.1)
    pid = int(pid_file.read_text())
    assert not pid_gone(pid)  # training on the "node"
    runner.cancel_all()
    thread.join(60)
    assert results and results[0].val_bpb is None and "the Ray task failed" in results[0].failure
    while not pid_gone(pid) and time.time() < deadline + 30:
        time.sleep(0.1)
    assert pid_gone(pid)
