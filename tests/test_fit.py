"""Issue 21: every run fitted to the GPU it trains on (prepare.fit_device_batch with train.py's
estimate), the re-run at half the device batch after running out of memory, the one-line refusals
(no bf16, a model that does not fit even one row), the report of the fits, and the attention kernel
chosen per GPU architecture. GPUs are faked; the kernels' check runs real kernels on the CPU."""

import time

import pytest
import torch

import prepare
import train
from autoresearch import cli, training
from autoresearch.report import report
from driver_helpers import BASE_LINE, MODE_LINE, fake, git, journal, repo, rows, run  # noqa: F401
from fake_anthropic import edit

GIB = 2**30

# Memory free once a CUDA context exists (a few hundred MiB less than torch's total_memory), as
# torch.cuda.mem_get_info reports it, and the device batch (of DEVICE_BATCH_SIZE = 128 at most, from
# 256 rows a step) the fit chooses at the defaults and at DEPTH = 16 (dim 1024, 285 M parameters).
GPUS = [  # name, free GiB, rows at the defaults, rows at DEPTH 16
    ("NVIDIA GeForce RTX 4090", 23.6, 32, 8),       # 24 GB
    ("NVIDIA GeForce RTX 5090", 31.4, 64, 16),      # 32 GB
    ("NVIDIA A100-SXM4-40GB", 39.1, 64, 16),        # 40 GB
    ("NVIDIA RTX 6000 Ada Generation", 47.0, 64, 32),  # 48 GB
    ("NVIDIA H100 80GB HBM3", 78.7, 128, 64),       # 80 GB
    ("NVIDIA H200", 139.3, 128, 64),                # 141 GB
]


@pytest.fixture
def gpu(monkeypatch):
    """gpu(name, free_gib, ...): torch.cuda answers as that GPU would (nothing else of CUDA is used)."""
    def install(name="NVIDIA H100 80GB HBM3", free_gib=78.7, capability=(9, 0), total_gib=79.2, fraction=1.0,
                reserved=0):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (int(free_gib * GIB), int(total_gib * GIB)))
        monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda *a: fraction)
        monkeypatch.setattr(torch.cuda, "memory_reserved", lambda *a: reserved)
    return install


def fit(monkeypatch, depth=8, device_batch_size=None):
    """train.py's own fit at the defaults (or another DEPTH): (rows, accumulation steps, need_bytes)."""
    monkeypatch.setattr(train, "DEPTH", depth)
    config = train.make_config(prepare.VOCAB_SIZE)
    with torch.device("meta"):
        num_params = sum(p.numel() for p in train.GPT(config).parameters())

    def need(rows):
        return train.estimate_memory_bytes(num_params, config, rows * prepare.MAX_SEQ_LEN)
    rows, steps = prepare.fit_device_batch(device_batch_size or train.DEVICE_BATCH_SIZE, train.TOTAL_BATCH_SIZE, need)
    return rows, steps, need


@pytest.mark.parametrize("name,free_gib,at_defaults,at_depth_16", GPUS)
def test_the_fit_for_each_gpu_at_the_defaults_and_a_wider_model(gpu, monkeypatch, capsys, name, free_gib,
                                                                at_defaults, at_depth_16):
    assert prepare.MAX_SEQ_LEN == 2048 and train.TOTAL_BATCH_SIZE == 2**19  # 256 rows a step
    gpu(name, free_gib)
    budget = prepare.memory_budget(int(free_gib * GIB))
    assert budget == pytest.approx(free_gib * GIB * (1 - prepare.FIT_HEADROOM) - prepare.FIT_RESERVE, abs=2)
    for depth, expected in ((8, at_defaults), (16, at_depth_16)):
        rows, steps, need = fit(monkeypatch, depth)
        assert (rows, steps) == (expected, 256 // expected)
        assert rows * steps * prepare.MAX_SEQ_LEN == train.TOTAL_BATCH_SIZE  # the step is kept: comparable numbers
        assert need(rows) <= budget  # it fits, with the headroom left ...
        assert rows == train.DEVICE_BATCH_SIZE or need(2 * rows) > budget  # ... and is the most that does
        line = capsys.readouterr().out.strip()
        assert line.startswith(f"fit: {name} (compute capability 9.0), {free_gib:.1f} GiB free, "
                               f"{budget / GIB:.1f} GiB usable: device batch {rows} rows, estimated peak "
                               f"{need(rows) / GIB:.1f} GiB"), line
        assert line.endswith(f"{steps} accumulation steps of 524,288 tokens")
        why = "at most DEVICE_BATCH_SIZE=128" if rows == 128 else f"{2 * rows} rows would need {need(2 * rows) / GIB:.1f} GiB"
        assert f"({why})" in line


def test_the_estimate_it_fits_with_is_the_reference_peak_at_the_defaults(monkeypatch, gpu):
    """45,060 MB was the H100 reference run's peak at 128 rows: the estimate is 1.7% above it (on the
    safe side); at 64 rows the activations halve."""
    gpu()
    rows, _, need = fit(monkeypatch)
    assert rows == 128 and 1.0 < need(128) / 2**20 / 45060.2 < 1.02
    assert need(64) < 0.55 * need(128)


def test_a_capped_process_fits_to_its_cap_and_the_driver_cap_lowers_the_batch(gpu, monkeypatch, capsys):
    """set_per_process_memory_fraction (the caps of the GPU check) is a smaller GPU; the driver's
    AUTORESEARCH_DEVICE_BATCH (after running out of memory) is a smaller DEVICE_BATCH_SIZE."""
    gpu(free_gib=78.7, total_gib=79.2, fraction=24 / 79.2)
    assert fit(monkeypatch)[0] == 32  # as the 4090's 23.6 GiB
    gpu(free_gib=78.7, total_gib=79.2, fraction=24 / 79.2, reserved=20 * GIB)  # what the process already holds
    assert fit(monkeypatch)[0] == 4  # 4.0 GiB free of its cap
    gpu()
    capsys.readouterr()
    monkeypatch.setattr(prepare, "DEVICE_BATCH", 16)
    assert fit(monkeypatch)[:2] == (16, 16)
    assert "(at most 16 (AUTORESEARCH_DEVICE_BATCH))" in capsys.readouterr().out


def test_the_largest_divisor_is_chosen_whatever_the_step(monkeypatch):
    """Not only powers of two: 384 rows a step (3 x 128) at most 128 a micro-step, within a budget."""
    def need(rows):
        return rows * 100
    assert prepare.choose_device_batch(384, 128, need, 10_000) == 96
    assert prepare.choose_device_batch(384, 128, need, None) == 128
    assert prepare.choose_device_batch(7, 128, need, None) == 7
    assert prepare.choose_device_batch(7, 6, need, None) == 1
    assert prepare.choose_device_batch(384, 128, need, 99) is None


def test_on_the_cpu_the_batch_is_the_largest_divisor_without_a_memory_fit(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert fit(monkeypatch, device_batch_size=100)[:2] == (64, 4)
    assert capsys.readouterr().out.startswith("fit: cpu, no memory fit: device batch 64 rows (at most "
                                              "DEVICE_BATCH_SIZE=100), 4 accumulation steps")


def test_one_line_refusals_name_what_to_change(gpu, monkeypatch):
    gpu("Tesla V100-SXM2-16GB", 15.5, capability=(7, 0))  # (bf16 emulated: torch.cuda.is_bf16_supported() says yes)
    with pytest.raises(SystemExit) as error:
        fit(monkeypatch)
    assert str(error.value) == ("error: Tesla V100-SXM2-16GB (compute capability 7.0) has no bf16, which training "
                                "needs: use a GPU of compute capability 8.0 or newer (A100, RTX 30xx, or newer)")
    gpu("NVIDIA GeForce RTX 3050 Laptop GPU", 3.6, capability=(8, 6))
    with pytest.raises(SystemExit) as error:
        fit(monkeypatch, depth=16)
    message = str(error.value)
    assert "\n" not in message and message.startswith("error: the model does not fit NVIDIA GeForce RTX 3050")
    for part in ("even a device batch of 1 row needs about 5.3 GiB", "2.2 of 3.6 GiB free may be used",
                 "AUTORESEARCH_MAX_SEQ_LEN, now 2048", "DEPTH"):
        assert part in message
    with pytest.raises(SystemExit, match=r"TOTAL_BATCH_SIZE=1000 must be a multiple of MAX_SEQ_LEN=2048"):
        prepare.fit_device_batch(128, 1000, lambda rows: 0)


def test_the_driver_refuses_a_gpu_without_bf16_at_start(monkeypatch):
    """One line before anything is written, naming the GPU; the GPUs --gpus does not use are not judged."""
    caps = {0: (8, 9), 1: (7, 5)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: caps[i])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: ["NVIDIA GeForce RTX 4090", "Tesla T4"][i])
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert cli.check_cuda(False, None) and cli.check_cuda(False, "0")
    for gpus in ("all", "1", "0,1"):
        with pytest.raises(SystemExit) as error:
            cli.check_cuda(False, gpus)
        assert str(error.value) == ("autoresearch: GPU 1 (Tesla T4) has compute capability 7.5, without bf16, which "
                                    "training needs: use a GPU of compute capability 8.0 or newer (A100, RTX 30xx, "
                                    "or newer; --gpus picks which)")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")  # this process sees physical GPUs 3 and 5 as 0 and 1
    assert cli.slot_devices("5", 2) == [1] and cli.slot_devices("3,5", 2) == [0, 1] and cli.slot_devices("7", 2) == []
    with pytest.raises(SystemExit, match="GPU 1 "):
        cli.check_cuda(False, "5")


# ---------------------------------------------------------------------------
# The driver: out of memory once, run again at half; a baseline that cannot fit stops the night
# ---------------------------------------------------------------------------

def test_a_run_out_of_memory_runs_again_at_half_its_device_batch(repo, fake):
    fake.replies += [edit("wider model", (MODE_LINE, 'MODE = "oom"'), (BASE_LINE, "TRUE_BPB = 0.980000"))]
    assert run("--max-experiments", "1", "--greedy") == 0
    r = rows(repo)
    assert [x["status"] for x in r] == ["keep", "keep"]
    assert r[1]["val_bpb"] == "0.980000"
    assert r[1]["description"] == "wider model [out of GPU memory at device batch 64: run again at 32]"
    assert len(fake.requests) == 1  # no fix was asked for: the same experiment, run again
    first, second = (repo / "runs/t/0001/train-oom.log").read_text(), (repo / "runs/t/0001/train.log").read_text()
    assert "device batch 64 rows" in first and "torch.OutOfMemoryError: CUDA out of memory" in first
    assert "device batch 32 rows" in second and "OutOfMemoryError" not in second
    finished = journal(repo)["finished"]
    assert [(f["n"], f["device_batch"], f["note"]) for f in finished] == [
        (0, 0, ""), (1, 32, "out of GPU memory at device batch 64: run again at 32")]
    lines = report(repo / "results.tsv", repo / "runs/t/journal.json")
    assert ("device batch (rows per micro-step, fitted to the GPU for each run): 32 in 1 run; run again at half "
            "after running out of GPU memory: experiment(s) 1") in lines


def test_a_run_out_of_memory_again_is_a_crash_row_that_says_so(repo, fake):
    fake.replies += [edit("much wider model", (MODE_LINE, 'MODE = "oom_always"'))]
    assert run("--max-experiments", "1", "--greedy", "--fix-attempts", "0") == 0
    r = rows(repo)[1]
    assert r["status"] == "crash"
    assert r["description"].endswith("[crash: no val_bpb: train.py exited with code 1 before its model was scored; "
                                     "out of GPU memory at device batch 64: run again at 32, out of memory again]")


def test_a_run_is_not_tried_again_when_it_could_not_end_in_time(repo, tmp_path):
    """The retry obeys the deadline as any run does (retry_until: the last time a run may start)."""
    (repo / "train.py").write_text((repo / "train.py").read_text().replace(MODE_LINE, 'MODE = "oom"'))
    prepare_module = training.load_prepare(repo)
    settings = {key: getattr(prepare_module, key.upper()) for key in training.SETTINGS_KEYS}

    def train_once(retry_until):
        return training.run_training(repo, tmp_path / "train.log", 42, 60, settings, None, prepare=prepare_module,
                                     retry_until=retry_until)
    late = train_once(time.time() - 1)
    assert (late.val_bpb, late.device_batch, late.out_of_memory, late.note) == (None, 64, True, "")
    assert not (tmp_path / "train-oom.log").exists()
    in_time = train_once(time.time() + 3600)
    assert (in_time.val_bpb, in_time.device_batch, in_time.out_of_memory) == (1.0, 32, False)
    assert in_time.note == "out of GPU memory at device batch 64: run again at 32"
    assert "device batch 64 rows" in (tmp_path / "train-oom.log").read_text()
    # nothing the first try wrote (validation inputs, a checkpoint) is there for the second
    assert "stash from an earlier try: False" in (tmp_path / "train.log").read_text()


def test_no_second_try_for_a_run_whose_scoring_began_or_that_only_mentions_memory(repo, tmp_path):
    """A run that has seen validation inputs is never run again; out of memory is its traceback's
    last line, not the words anywhere (an attention check that passed a kernel over, a warning)."""
    (repo / "train.py").write_text((repo / "train.py").read_text().replace(MODE_LINE, 'MODE = "oom_in_scoring"'))
    prepare_module = training.load_prepare(repo)
    settings = {key: getattr(prepare_module, key.upper()) for key in training.SETTINGS_KEYS}
    result = training.run_training(repo, tmp_path / "train.log", 42, 60, settings, None, prepare=prepare_module)
    assert "OutOfMemoryError: CUDA out of memory" in (tmp_path / "train.log").read_text()
    assert (result.val_bpb, result.out_of_memory, result.note) == (None, False, "")
    assert not (tmp_path / "train-oom.log").exists()
    assert training.OUT_OF_MEMORY.search("Traceback ...\ntorch.OutOfMemoryError: CUDA out of memory. Tried")
    assert training.OUT_OF_MEMORY.search("RuntimeError: CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling x")
    assert not training.OUT_OF_MEMORY.search("attention (compute capability 8.6): full context flash; passed over: "
                                             "cudnn for full (RuntimeError: CUDA out of memory)\nValueError: bad")
    # a run that knew its score gets no fix, whatever note follows
    assert not training.fixable("stopped at a limit: x after its model was scored; out of GPU memory at device batch 64")
    # a "fit:" line of any length is read safely (a number too long to be a batch is none)
    assert training.FIT_LINE.search("fit: x: device batch 64 rows, 4 accumulation steps")[1] == "64"
    assert training.FIT_LINE.search("fit: x: device batch " + "9" * 5000 + " rows") is None


def test_a_baseline_that_does_not_fit_stops_the_night_with_one_line(repo, fake):
    (repo / "train.py").write_text((repo / "train.py").read_text().replace(MODE_LINE, 'MODE = "nofit"'))
    git(repo, "commit", "-q", "-am", "a model too big for this GPU")
    with pytest.raises(SystemExit) as error:
        run("--max-experiments", "1")
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("autoresearch: the baseline stopped: the model does not fit the stand-in GPU: even a "
                              "device batch of 1 row needs about 90.0 GiB")
    assert "AUTORESEARCH_MAX_SEQ_LEN" in message and "DEPTH" in message and "runs/t/0000/train.log" in message


# ---------------------------------------------------------------------------
# Attention: the fastest kernel the GPU has, each checked at start, the next one when it fails
# ---------------------------------------------------------------------------

def test_the_attention_kernels_are_chosen_by_compute_capability():
    def every(kernel, path):
        return ""
    assert train.choose_attention_kernels((8, 0), every) == ({"full": "flash", "window": "flex"}, [])
    assert train.choose_attention_kernels((8, 9), every)[0] == {"full": "flash", "window": "flex"}  # Ada
    for capability in ((9, 0), (10, 0), (12, 0)):  # Hopper, Blackwell (data centre, RTX 50xx)
        assert train.choose_attention_kernels(capability, every)[0] == {"full": "cudnn", "window": "flex"}

    def no_cudnn_no_flex(kernel, path):
        return "RuntimeError: No viable backend" if kernel in ("cudnn", "flex") else ""
    chosen, passed_over = train.choose_attention_kernels((9, 0), no_cudnn_no_flex)
    assert chosen == {"full": "flash", "window": "dense"}
    assert passed_over == ["cudnn for full (RuntimeError: No viable backend)",
                           "flex for window (RuntimeError: No viable backend)"]
    with pytest.raises(RuntimeError, match=r"no attention kernel for the full layers passed its check: "
                                           r"cudnn for full \(broken\); flash for full \(broken\)"):
        train.choose_attention_kernels((9, 0), lambda kernel, path: "broken")


def test_flash_attention_4_is_tried_first_where_it_is_listed_and_passed_over_when_missing(monkeypatch):
    monkeypatch.setattr(train, "FULL_ATTENTION", {9: ("fa4", "cudnn")})
    monkeypatch.setattr(train, "WINDOW_ATTENTION", {9: ("fa4", "flex")})
    chosen, passed_over = train.choose_attention_kernels(
        (9, 0), lambda kernel, path: train.check_attention_kernel(kernel, path, 16, "cpu") if kernel == "fa4" else "")
    assert chosen == {"full": "cudnn", "window": "flex"}
    assert passed_over == ["fa4 for full (not installed (pip install flash-attn-4))",
                           "fa4 for window (not installed (pip install flash-attn-4))"]


def test_the_kernel_check_runs_each_kernel_against_the_reference(monkeypatch):
    """On the CPU, for real: math and dense pass (bf16 and fp32), flash has a CPU kernel, cuDNN and
    FlexAttention's backward do not; a kernel with a wrong mask is refused, never used."""
    for kernel, path in (("math", "full"), ("flash", "full"), ("dense", "window"), ("math", "window")):
        assert train.check_attention_kernel(kernel, path, 16, "cpu") == ""
        assert train.check_attention_kernel(kernel, path, 16, "cpu", torch.float32) == ""
    assert train.check_attention_kernel("cudnn", "full", 16, "cpu").startswith("RuntimeError: No viable backend")
    assert train.check_attention_kernel("flex", "window", 16, "cpu").startswith("NotImplementedError: FlexAttention "
                                                                                 "does not support backward on CPU")
    attention = train.causal_attention

    def wrong(q, k, v, window, kernel="sdpa", block_mask=None):
        if kernel == "whole-triangle":  # ignores the window
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        if kernel == "bidirectional":
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return attention(q, k, v, window, kernel, block_mask)
    monkeypatch.setattr(train, "causal_attention", wrong)
    assert train.check_attention_kernel("whole-triangle", "window", 16, "cpu").startswith(
        "its output differs from the reference by")
    assert train.check_attention_kernel("bidirectional", "full", 16, "cpu").startswith(
        "its output differs from the reference by")


def test_a_forced_sdpa_backend_compiles_into_one_graph():
    """The chosen backend is forced inside the compiled model (sdpa_kernel): no graph break."""
    q, k, v = (torch.randn(1, 2, 64, 16) for _ in range(3))
    compiled = torch.compile(train.causal_attention, fullgraph=True, backend="aot_eager")
    for window, kernel in ((64, "math"), (16, "math"), (64, "flash"), (16, "dense")):
        torch.testing.assert_close(compiled(q, k, v, window, kernel), train.causal_attention(q, k, v, window, "math"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_the_kernels_are_checked_and_the_first_passing_ones_run():
    """On this GPU: each kernel its list names is checked for real; those chosen are the first that pass,
    and a Hopper (or newer) GPU uses cuDNN for full context and FlexAttention for the windows."""
    capability = torch.cuda.get_device_capability()
    checks = {}

    def check(kernel, path):
        checks[kernel, path] = train.check_attention_kernel(kernel, path, 128, torch.device("cuda"))
        return checks[kernel, path]
    chosen, passed_over = train.choose_attention_kernels(capability, check)
    print(f"compute capability {capability}: {chosen}; checks {checks}")
    assert len(passed_over) == sum(bool(why) for why in checks.values())
    if capability[0] >= 9:
        assert chosen == {"full": "cudnn", "window": "flex"}, checks


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_the_defaults_fit_this_gpu(monkeypatch, capsys):
    rows, steps, need = fit(monkeypatch)
    free = prepare.gpu_free_bytes()
    print(capsys.readouterr().out)
    assert rows * steps == 256 and need(rows) <= prepare.memory_budget(free)
