"""
Benchmark the attention candidates for train.py's layers: forward + backward time, effective
TFLOP/s (counted as train.py's MFU formula does: 12 * heads * head_dim * keys seen, per token)
and the largest deviation from a dense masked reference. Prints figures; asserts nothing.

Usage: python bench/bench_attention.py [--max-autotune] [NAME_PREFIX ...]
       (CUDA; on CPU: tiny shapes, a smoke check. Prefixes keep only the candidates they start.)

Candidates, sliding window (half context) and full context:
  flex      FlexAttention under torch.compile with a block mask built once (train.py's CUDA path);
            on CUDA also flex[...] with the kernel tiles of FLEX_VARIANTS (train.py's FLEX_KERNEL_OPTIONS),
            and with --max-autotune flex-autotune (Inductor times its own list of tiles and keeps the
            best; its choices are logged on stderr)
  fa4       FlashAttention-4 (flash-attn-4, CuTeDSL; Hopper and Blackwell) through train.py's "fa4"
            kernel, with its window; "unavailable" where it is not installed
  varlen    torch.nn.attention.varlen.varlen_attn with window_size=(window, 0) (bundled FA2), where
            the installed torch has it
  sdpa-*    F.scaled_dot_product_attention with one backend forced (full context: is_causal=True;
            window: a dense boolean mask, which computes every block)
  causal-*  (window rows only) SDPA with is_causal=True on each backend: the whole causal triangle,
            so not the window's result, but the time a windowed kernel has to beat to be worth it
            (at T=2048, window 1024 the window skips only ~21% of the causal blocks)
"""

import contextlib
import math
import os
import sys
import time
from functools import partial

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import flex_attention

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from train import build_block_mask, causal_attention  # noqa: E402

CUDA = torch.cuda.is_available()
B, H, T, D = (128, 4, 2048, 128) if CUDA else (2, 2, 256, 32)  # train.py's defaults per micro-step
DTYPE = torch.bfloat16 if CUDA else torch.float32
REPEATS = 20 if CUDA else 2
MAX_AUTOTUNE = "--max-autotune" in sys.argv[1:]
ONLY = tuple(a for a in sys.argv[1:] if not a.startswith("--")) or ("",)
# kernel_options for FlexAttention (keys as in torch/_inductor/kernel/flex; fwd_/bwd_ prefixes pick one
# pass). PyTorch's H100 defaults at head_dim 128, bf16: forward 128x64 (3 stages, 8 warps), backward
# M1/N1/M2/N2 = 64/128/128/64 (3 stages, 8 warps); the backward takes ~70% of the layer's time.
FLEX_VARIANTS = {  # (ROWS_GUARANTEED_SAFE=True gave NaN here: torch 2.11, H100)
    "bwd64": dict(bwd_BLOCK_M1=64, bwd_BLOCK_N1=64, bwd_BLOCK_M2=64, bwd_BLOCK_N2=64,
                  bwd_num_warps=4, bwd_num_stages=3),
    "bwd32x128": dict(bwd_BLOCK_M1=32, bwd_BLOCK_N1=128, bwd_BLOCK_M2=128, bwd_BLOCK_N2=32,
                      bwd_num_warps=4, bwd_num_stages=3),
    "bwd32x64": dict(bwd_BLOCK_M1=32, bwd_BLOCK_N1=64, bwd_BLOCK_M2=64, bwd_BLOCK_N2=32,
                     bwd_num_warps=4, bwd_num_stages=3),
    "bwd64x128s2": dict(bwd_BLOCK_M1=64, bwd_BLOCK_N1=128, bwd_BLOCK_M2=128, bwd_BLOCK_N2=64,
                        bwd_num_warps=8, bwd_num_stages=2),
    "fwd128x128": dict(fwd_BLOCK_M=128, fwd_BLOCK_N=128, fwd_num_warps=8, fwd_num_stages=2),
}


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
        out["flex"] = lambda q, k, v: attend(q, k, v, window, "flex", block_mask)
        for name, options in (FLEX_VARIANTS.items() if CUDA else ()):
            tuned = partial(flex_attention, block_mask=block_mask, kernel_options=options)
            out[f"flex[{name}]"] = torch.compile(tuned, dynamic=False)
        if CUDA and MAX_AUTOTUNE:
            out["flex-autotune"] = torch.compile(partial(flex_attention, block_mask=block_mask), dynamic=False,
                                                 mode="max-autotune-no-cudagraphs")
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        varlen_attn = None
        print(f"{'varlen':>15}  unavailable: torch {torch.__version__} has no torch.nn.attention.varlen")
    if CUDA and varlen_attn is not None:
        cu_seq = torch.arange(0, (B + 1) * T, T, device=DEVICE, dtype=torch.int32)

        def varlen(q, k, v):  # (B, H, T, D) -> (B*T, H, D) and back
            flat = [t.transpose(1, 2).reshape(B * T, H, D) for t in (q, k, v)]
            y = varlen_attn(*flat, cu_seq, cu_seq, T, T, window_size=(-1 if full else window, 0))
            return y.view(B, T, H, D).transpose(1, 2)
        out["varlen"] = varlen
    if CUDA:  # FlashAttention-4 (pip install flash-attn-4): train.py's "fa4" kernel, where installed
        out["fa4"] = lambda q, k, v: causal_attention(q, k, v, window, "fa4")
    mask = None if full else dense_mask(window)
    backends = {"sdpa-default": None, "sdpa-flash": SDPBackend.FLASH_ATTENTION,
                "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
                "sdpa-math": SDPBackend.MATH}
    for name, backend in backends.items():
        def sdpa(q, k, v, backend=backend, causal=full, mask=mask):
            with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal, attn_mask=mask)
        out[name] = sdpa
        if not full and name != "sdpa-math":
            out["causal-" + name.removeprefix("sdpa-")] = partial(sdpa, causal=True, mask=None)
    return out


DEVICE = "cuda" if CUDA else "cpu"
print(f"device: {torch.cuda.get_device_name() if CUDA else 'cpu (smoke run, tiny shapes)'}, torch {torch.__version__}")
print(f"shape (B, H, T, D) = {(B, H, T, D)}, {DTYPE}, median of {REPEATS}")
torch.manual_seed(0)
q, k, v = [torch.randn(B, H, T, D, device=DEVICE, dtype=DTYPE, requires_grad=True) for _ in range(3)]
grad_out = torch.randn(B, H, T, D, device=DEVICE, dtype=DTYPE)
fastest = {}  # window -> (ms, name) of the fastest candidate that computes the window exactly
for window in (T // 2, T):
    keys_seen = min(window, T)
    flops = 12 * H * D * keys_seen * B * T  # forward + backward, train.py's MFU formula
    with torch.no_grad():
        reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=dense_mask(window))
        causal_reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    print(f"\nwindow {window} ({'full context' if window >= T - 1 else 'sliding'}):")
    print(f"{'candidate':>15} {'fwd+bwd ms':>11} {'TFLOP/s':>8} {'max |diff|':>11}")
    for name, fn in [(n, f) for n, f in candidates(window).items() if n.startswith(ONLY)]:
        backward = CUDA or name != "flex"  # FlexAttention has no CPU backward
        try:  # a benchmark reports a backend that cannot run here and goes on
            seconds, out = timed(fn, *(t if backward else t.detach() for t in (q, k, v)), backward)
        except Exception as error:  # noqa: BLE001  (compile errors, triton's OutOfResources, no kernel)
            print(f"{name:>15}  unavailable: {str(error).splitlines()[0][:90]}")
            continue
        for t in (q, k, v):
            t.grad = None
        causal_only = name.startswith("causal-")
        if backward and not causal_only:
            fastest[window] = min(fastest.get(window, (math.inf, "")), (seconds * 1e3, name))
        diff = (out.float() - (causal_reference if causal_only else reference)).abs().max().item()
        print(f"{name:>15} {seconds * 1e3:11.2f} {flops / seconds / 1e12:8.1f} {diff:11.2e}"
              + ("" if backward else "  (forward only: ms and TFLOP/s not comparable)")
              + ("  (whole causal triangle: TFLOP/s counted at the window's work)" if causal_only else ""))
print()
for window, (ms, name) in fastest.items():
    options = FLEX_VARIANTS.get(name[len("flex["):-1]) if name.startswith("flex[") else None
    print(f"fastest exact candidate, window {window}: {name} {ms:.2f} ms"
          + (f"  FLEX_KERNEL_OPTIONS = {options!r}" if options else ""))
