"""
Profile train.py's training step on CUDA at its defaults: the kernels that take the GPU's time over
a few optimizer steps (random tokens: the kernels do not depend on the data), and the steady-state
step time with and without the profiler. Prints figures; asserts nothing.

Usage: python bench/profile_step.py [STEPS] [TRACE.json]
"""

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import train  # noqa: E402  (imports prepare first, which points the compile cache into the project cache)
import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

STEPS = int(sys.argv[1]) if len(sys.argv) > 1 else 3
TRACE = sys.argv[2] if len(sys.argv) > 2 else None
WARM_STEPS = 4  # compile and settle before anything is timed

if not torch.cuda.is_available():
    raise SystemExit("bench/profile_step.py needs CUDA")
torch.manual_seed(0)
model, raw_model = train.build_model(8192, torch.device("cuda"))
optimizer = train.MuonAdamW(raw_model, compile_steps=True)
config = raw_model.config
B, T = train.DEVICE_BATCH_SIZE, train.MAX_SEQ_LEN
grad_accum_steps = train.TOTAL_BATCH_SIZE // (B * T)
x = torch.randint(0, config.vocab_size, (B, T), device="cuda")
y = torch.randint(0, config.vocab_size, (B, T), device="cuda")


def step():
    for _ in range(grad_accum_steps):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(x, y)
        (loss / grad_accum_steps).backward()
    optimizer.step(1.0, train.MUON_MOMENTUM_END, train.WEIGHT_DECAY)
    raw_model.zero_grad(set_to_none=True)


def seconds_per_step(n):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n


t0 = time.perf_counter()
for _ in range(WARM_STEPS):
    step()
torch.cuda.synchronize()
print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}; {WARM_STEPS} warm-up steps "
      f"(compile included) took {time.perf_counter() - t0:.1f}s")
dt = seconds_per_step(10)
print(f"step: {dt * 1e3:.1f} ms = {train.TOTAL_BATCH_SIZE / dt:,.0f} tokens/s "
      f"({grad_accum_steps} x {B} x {T}, no data loader, no host syncs)")
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    for _ in range(STEPS):
        step()
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=45, max_name_column_width=90))
if TRACE:
    prof.export_chrome_trace(TRACE)
