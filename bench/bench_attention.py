"""
Benchmark the attention candidates for train.py's layers: forward + backward time, effective
TFLOP/s (counted as train.py's MFU formula does: 12 * heads * head_dim * keys seen, per token)
and the largest deviation from a dense masked reference. Prints figures; asserts nothing.

Usage: python bench/bench_attention.py        (CUDA; on CPU it runs tiny shapes as a smoke check)

Candidates, sliding window (half context) and full context:
  flex      FlexAttention under torch.compile with a block mask built once (train.py's CUDA path)
  varlen    torch.nn.attention.varlen.varlen_attn with window_size=(window, 0) (bundled FA2)
  sdpa-*    F.scaled_dot_product_attention with one backend forced (full context: is_causal=True;
            window: a dense boolean mask, which computes every block)
"""

import contextlib
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from train import build_block_mask, causal_attention  # noqa: E402

CUDA = torch.cuda.is_available()
B, H, T, D = (128, 4, 2048, 128) if CUDA else (2, 2, 256, 32)  # train.py's defaults per micro-step
DTYPE = torch.bfloat16 if CUDA else torch.float32
REPEATS = 20 if CUDA else 2


def dense_mask(window):
    pos = torch.arange(T, device=DEVICE)
    offset = pos[:, None] - pos[None, :]
    return (offset >= 0) & (offset <= window)


def timed(fn, q, k, v, backward):
    """Median seconds of fn(q, k, v) (+ backward), and its output."""
    def run():
        out = fn(q, k, v)
        if backward:
            out.backward(grad_out)
        return out
    out = run()  # compile / warm up
    run()
    times = []
    for _ in range(REPEATS):
        if CUDA:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        run()
        if CUDA:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2], out.detach()


def candidates(window):
    """name -> fn(q, k, v) for one layer type."""
    full = window >= T - 1
    out = {}
    if not full:
        block_mask = build_block_mask(window, T, DEVICE)
        attend = torch.compile(causal_attention, dynamic=False) if CUDA else causal_attention
        out["flex"] = lambda q, k, v: attend(q, k, v, window, block_mask)
    if CUDA:
        from torch.nn.attention.varlen import varlen_attn
        cu_seq = torch.arange(0, (B + 1) * T, T, device=DEVICE, dtype=torch.int32)

        def varlen(q, k, v):  # (B, H, T, D) -> (B*T, H, D) and back
            flat = [t.transpose(1, 2).reshape(B * T, H, D) for t in (q, k, v)]
            y = varlen_attn(*flat, cu_seq, cu_seq, T, T, window_size=(-1 if full else window, 0))
            return y.view(B, T, H, D).transpose(1, 2)
        out["varlen"] = varlen
    mask = None if full else dense_mask(window)
    backends = {"sdpa-default": None, "sdpa-flash": SDPBackend.FLASH_ATTENTION,
                "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
                "sdpa-math": SDPBackend.MATH}
    for name, backend in backends.items():
        def sdpa(q, k, v, backend=backend):
            with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
                return F.scaled_dot_product_attention(q, k, v, is_causal=full, attn_mask=mask)
        out[name] = sdpa
    return out


DEVICE = "cuda" if CUDA else "cpu"
print(f"device: {torch.cuda.get_device_name() if CUDA else 'cpu (smoke run, tiny shapes)'}, torch {torch.__version__}")
print(f"shape (B, H, T, D) = {(B, H, T, D)}, {DTYPE}, median of {REPEATS}")
torch.manual_seed(0)
q, k, v = [torch.randn(B, H, T, D, device=DEVICE, dtype=DTYPE, requires_grad=True) for _ in range(3)]
grad_out = torch.randn(B, H, T, D, device=DEVICE, dtype=DTYPE)
for window in (T // 2, T):
    keys_seen = min(window, T)
    flops = 12 * H * D * keys_seen * B * T  # forward + backward, train.py's MFU formula
    with torch.no_grad():
        reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=dense_mask(window))
    print(f"\nwindow {window} ({'full context' if window >= T - 1 else 'sliding'}):")
    print(f"{'candidate':>15} {'fwd+bwd ms':>11} {'TFLOP/s':>8} {'max |diff|':>11}")
    for name, fn in candidates(window).items():
        backward = CUDA or name != "flex"  # FlexAttention has no CPU backward
        try:  # a benchmark reports a backend that cannot run here and goes on
            seconds, out = timed(fn, *(t if backward else t.detach() for t in (q, k, v)), backward)
        except (RuntimeError, NotImplementedError) as error:
            print(f"{name:>15}  unavailable: {str(error).splitlines()[0][:90]}")
            continue
        for t in (q, k, v):
            t.grad = None
        diff = (out.float() - reference).abs().max().item()
        print(f"{name:>15} {seconds * 1e3:11.2f} {flops / seconds / 1e12:8.1f} {diff:11.2e}"
              + ("" if backward else "  (forward only: ms and TFLOP/s not comparable)"))
