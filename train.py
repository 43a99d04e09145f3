"""
Pretrain a small GPT for a fixed wall-clock budget and report val_bpb. This is the one file
the research LLM edits: model, optimizer (Muon for matrices, AdamW for the rest) and the
time-budgeted loop. Runs fast on one CUDA GPU (bf16, torch.compile, FlexAttention for the
sliding windows) and slowly but with the same semantics on CPU (fp32, eager).

Usage: python train.py
"""

import gc
import importlib.util
import math
import re
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

T_START = time.time()  # total_seconds counts from here, before the slow imports (torch, prepare)

# prepare first: it points torch's compile cache (TORCHINDUCTOR_CACHE_DIR) into its cache, then imports torch
from prepare import (EVAL_TOKENS, MAX_SEQ_LEN, SEED, TIME_BUDGET, Tokenizer,  # noqa: E402
                     evaluate_bpb, fit_device_batch, make_dataloader)
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: E402

# ---------------------------------------------------------------------------
# Hyperparameters (edit these directly)
# ---------------------------------------------------------------------------

DEPTH = 8                       # transformer layers
ASPECT_RATIO = 64               # model dim = DEPTH * ASPECT_RATIO, rounded up to a multiple of HEAD_DIM
HEAD_DIM = 128                  # channels per attention head
WINDOW_PATTERN = "SSSL"         # per-layer attention window, repeated: S = half context, L = full; last layer is L
FLEX_KERNEL_OPTIONS = {}        # FlexAttention tiles for the S layers on CUDA (speed only; {} = PyTorch's defaults)
# Attention kernels on CUDA, fastest first, by compute capability (the entry at or below the GPU's):
# at start the first that runs and matches a plain fp32 reference is used for every layer of its kind.
# Hopper measured (bench/README.md): full context cuDNN 5.4 ms, flash 9.0; window Flex 5.9, dense 13.9.
# "fa4" (pip install flash-attn-4: FlashAttention-4, Hopper and Blackwell) is a candidate to put first.
FULL_ATTENTION = {8: ("flash", "cudnn", "efficient", "math"),   # Ampere, Ada: PyTorch's FlashAttention-2
                  9: ("cudnn", "flash", "efficient", "math")}   # Hopper, Blackwell: cuDNN
WINDOW_ATTENTION = {8: ("flex", "dense")}                       # Flex skips masked blocks; dense computes all
VE_GATE_CHANNELS = 32           # value-embedding gate reads this many leading channels of the attention input
SOFTCAP = 15.0                  # logits soft-cap: SOFTCAP * tanh(logits / SOFTCAP)
TOTAL_BATCH_SIZE = 2**19        # tokens per optimizer step (gradient accumulation fills it)
DEVICE_BATCH_SIZE = 128         # rows per micro-step at most; each run takes the most that fit its GPU (see main)
EMBEDDING_LR = 0.6              # AdamW lr of the token embedding (scaled by (dim/768)^-0.5)
VALUE_EMBEDDING_LR = 0.6        # AdamW lr of the value embeddings (scaled by (dim/768)^-0.5)
UNEMBEDDING_LR = 0.004          # AdamW lr of lm_head (scaled by (dim/768)^-0.5)
RESID_LAMBDA_LR = 0.005         # AdamW lr of the per-layer residual scales
X0_LAMBDA_LR = 0.5              # AdamW lr of the per-layer x0 mixing scales
ADAM_BETAS = (0.8, 0.95)        # AdamW betas (x0 lambdas use X0_LAMBDA_BETAS)
X0_LAMBDA_BETAS = (0.96, 0.95)  # AdamW betas of the x0 lambdas
ADAM_EPS = 1e-10                # AdamW epsilon
MATRIX_LR = 0.04                # Muon lr, times sqrt(max(1, rows/cols)) per matrix shape
MUON_MOMENTUM_START = 0.85      # Muon momentum ramps linearly from this ...
MUON_MOMENTUM_END = 0.95        # ... to this ...
MUON_MOMENTUM_RAMP_STEPS = 300  # ... over this many steps
NORMUON_BETA = 0.95             # NorMuon second-moment EMA factor
WEIGHT_DECAY = 0.2              # Muon cautious weight decay, decays linearly to 0 with progress
WARMUP_RATIO = 0.0              # fraction of the budget with linear LR warm-up
WARMDOWN_RATIO = 0.5            # fraction of the budget at the end with linear LR warm-down
FINAL_LR_FRAC = 0.0             # LR multiplier at the very end of the warm-down
WARMUP_STEPS = 11               # steps 0..10 compile and warm up: their time is not counted
GC_EVERY_STEPS = 5000           # run Python's (otherwise disabled) garbage collector this often

# ---------------------------------------------------------------------------
# GPU peak throughput (facts for MFU, not hyperparameters)
# ---------------------------------------------------------------------------

# Dense BF16 tensor-core FLOP/s with FP32 accumulation, no sparsity; the first key found as a
# whole word (case-insensitive) in torch.cuda.get_device_name() wins.
GPU_PEAK_FLOPS = [
    ("H100 NVL", 835e12),    # NVIDIA H100 Tensor Core GPU datasheet: BF16 1,671 TFLOPS with sparsity
    ("H100 PCIe", 756e12),   # NVIDIA H100 Tensor Core GPU datasheet: BF16 1,513 TFLOPS with sparsity
    ("H100", 989.5e12),      # NVIDIA H100 Tensor Core GPU datasheet (SXM5): BF16 1,979 TFLOPS with sparsity
    ("H200 NVL", 835e12),    # NVIDIA H200 Tensor Core GPU datasheet: BF16 1,671 TFLOPS with sparsity
    ("H200", 989.5e12),      # NVIDIA H200 Tensor Core GPU datasheet (SXM): BF16 1,979 TFLOPS with sparsity
    ("A100", 312e12),        # NVIDIA A100 Tensor Core GPU datasheet: BF16 312 TFLOPS (624 with sparsity)
    ("L40S", 362.05e12),     # NVIDIA L40S datasheet: BF16 362.05 TFLOPS (733 with sparsity)
    ("RTX 4090", 165.2e12),  # NVIDIA Ada GPU Architecture whitepaper, Appendix: BF16 w/ FP32 accumulate 165.2
    ("RTX 3090", 71e12),     # NVIDIA Ampere GA102 GPU Architecture whitepaper, Appendix: BF16 w/ FP32 accumulate 71
    ("A10G", 70e12),         # NVIDIA A10G for AWS datasheet (d1.awsstatic.com): BF16 70 TFLOPS (140 with sparsity)
    ("A10", 125e12),         # NVIDIA A10 Tensor Core GPU datasheet: BF16 125 TFLOPS (250 with sparsity)
]


def gpu_peak_flops(device_name):
    """Dense bf16 peak FLOP/s of the named GPU, or 0.0 when it is not in the table."""
    for key, flops in GPU_PEAK_FLOPS:
        if re.search(rf"\b{re.escape(key)}\b", device_name, flags=re.IGNORECASE):
            return flops
    return 0.0


# ---------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------

@dataclass
class GPTConfig:
    sequence_len: int
    vocab_size: int
    n_layer: int
    n_head: int
    n_embd: int
    window_pattern: str


def make_config(vocab_size, sequence_len=MAX_SEQ_LEN):
    """The model shape implied by the CAPS constants."""
    n_embd = -(-DEPTH * ASPECT_RATIO // HEAD_DIM) * HEAD_DIM
    assert n_embd >= VE_GATE_CHANNELS, f"model dim {n_embd} < VE_GATE_CHANNELS={VE_GATE_CHANNELS}: raise ASPECT_RATIO"
    return GPTConfig(sequence_len, vocab_size, DEPTH, n_embd // HEAD_DIM, n_embd, WINDOW_PATTERN)


def layer_windows(config):
    """Keys each layer's query looks back: S = half the context, L = the whole; last layer L."""
    assert set(config.window_pattern) <= {"S", "L"}, f"WINDOW_PATTERN may only hold S and L, got {config.window_pattern!r}"
    sizes = {"S": config.sequence_len // 2, "L": config.sequence_len}
    windows = [sizes[config.window_pattern[i % len(config.window_pattern)]] for i in range(config.n_layer)]
    windows[-1] = config.sequence_len
    return windows


def has_value_embedding(layer, n_layer):
    """Value embeddings on alternating layers, the last one always included."""
    return layer % 2 == (n_layer - 1) % 2


def norm(x):
    """RMS norm without a weight, returning x's dtype: the residual stream is bf16 on CUDA (as in the
    original) whatever the torch version's autocast does with rms_norm (2.11 keeps it in bf16, 2.13 runs
    it in fp32, which would silently make the stream fp32 and change results and memory)."""
    return F.rms_norm(x, (x.size(-1),)).to(x.dtype)


def apply_rotary(x, cos, sin):
    """Rotate the two halves of each head: x (B, T, H, D), cos/sin (1, T, 1, D/2)."""
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], dim=-1).type_as(x)


SDPA_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                 "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


def causal_attention(q, k, v, window, kernel="sdpa", block_mask=None):
    """Attention over (B, H, T, D) in which query i sees keys i-window .. i, by `kernel`.

    "flex": FlexAttention with a prebuilt block mask, which skips the masked-out blocks; "fa4":
    FlashAttention-4; otherwise SDPA (one backend forced when `kernel` names one): full context
    is_causal, a window a dense boolean mask (CPU, tests, and sequences shorter than the mask's)."""
    T = q.size(-2)
    full = window >= T - 1
    if kernel == "fa4":
        from flash_attn.cute import flash_attn_func
        y = flash_attn_func(*(t.transpose(1, 2) for t in (q, k, v)), causal=True,
                            window_size=(None if full else window, 0))
        return (y[0] if isinstance(y, tuple) else y).transpose(1, 2)
    if kernel == "flex" and block_mask is not None and not full:
        return flex_attention(q, k, v, block_mask=block_mask, kernel_options=FLEX_KERNEL_OPTIONS or None)
    with sdpa_kernel(SDPA_BACKENDS[kernel]) if kernel in SDPA_BACKENDS else nullcontext():
        if full:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        pos = torch.arange(T, device=q.device)
        offset = pos[:, None] - pos[None, :]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=(offset >= 0) & (offset <= window))


def build_block_mask(window, T, device):
    """FlexAttention block mask for a causal sliding window; build once, reuse every step."""
    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx <= window)
    return create_block_mask(mask_mod, B=None, H=None, Q_LEN=T, KV_LEN=T, device=device)


def check_attention_kernel(kernel, path, head_dim, device, dtype=torch.bfloat16):
    """"" when `kernel` runs here for `path` ("full" or "window") and matches SDPA's math backend in
    fp32 on a small input, forward and gradients, within bf16's noise; else why not (one line). The
    window is short, so that a key too many or too few moves the output well past that noise;
    FlexAttention is compiled on CUDA, as training runs it (its Triton kernels, FLEX_KERNEL_OPTIONS)."""
    if kernel == "fa4" and importlib.util.find_spec("flash_attn") is None:
        return "not installed (pip install flash-attn-4)"
    T = 256
    window = T if path == "full" else 8
    g = torch.Generator(device=device).manual_seed(0)
    inputs = [torch.randn(2, T, 2, head_dim, device=device, dtype=torch.float32, generator=g).transpose(1, 2)
              for _ in range(3)]  # (B, H, T, D) views of (B, T, H, D), as the model makes them
    grad_out = torch.randn(2, 2, T, head_dim, device=device, generator=g)
    results = []
    for name, dt in ((kernel, dtype), ("math", torch.float32)):
        q, k, v = (t.detach().to(dt).requires_grad_() for t in inputs)
        try:
            block_mask = build_block_mask(window, T, device) if name == "flex" else None
            attend = torch.compile(causal_attention, dynamic=False) if name == "flex" and q.is_cuda else causal_attention
            y = attend(q, k, v, window, name, block_mask)
            y.float().backward(grad_out)
        except Exception as error:  # noqa: BLE001  (no kernel for this GPU, dtype or shape; not installed)
            return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:120]}"
        results.append([y.float(), q.grad.float(), k.grad.float(), v.grad.float()])
    for what, got, want in zip(("output", "dq", "dk", "dv"), *results):
        error = ((got - want).abs().max() / want.abs().max()).item()
        if not error <= 0.02:  # (bf16: well under 1%; a key too many in a window of 9: ~10%)
            return f"its {what} differs from the reference by {error:.1%} of the largest value"
    return ""


def choose_attention_kernels(capability, check):
    """{"full": kernel, "window": kernel}: for each kind of layer, the first kernel of its list for this
    compute capability that check(kernel, path) passes (returns ""); and the ones that did not, why."""
    chosen, passed_over = {}, []
    for path, table in (("full", FULL_ATTENTION), ("window", WINDOW_ATTENTION)):
        key = max([m for m in table if m <= capability[0]], default=min(table))
        for kernel in table[key]:
            why = check(kernel, path)
            if not why:
                chosen[path] = kernel
                break
            passed_over.append(f"{kernel} for {path} ({why})")
        else:
            raise RuntimeError(f"no attention kernel for the {path} layers passed its check: {'; '.join(passed_over)}")
    return chosen, passed_over


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.n_embd // config.n_head
        self.c_q = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.c_k = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.c_v = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        has_ve = has_value_embedding(layer, config.n_layer)
        self.ve_gate = nn.Linear(VE_GATE_CHANNELS, self.n_head, bias=False) if has_ve else None

    def forward(self, x, ve, cos, sin, window, kernel, block_mask):
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_head, self.head_dim)
        if ve is not None:  # value residual: a gated per-token embedding added to v, one gate per kv head
            gate = 2 * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]))  # (B, T, H)
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_head, self.head_dim)
        q, k = norm(apply_rotary(q, cos, sin)), norm(apply_rotary(k, cos, sin))  # same dtype as v (bf16 on CUDA)
        y = causal_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), window, kernel, block_mask)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer)
        self.mlp = MLP(config)

    def forward(self, x, ve, cos, sin, window, kernel, block_mask):
        x = x + self.attn(norm(x), ve, cos, sin, window, kernel, block_mask)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.windows = layer_windows(config)
        self.block_masks = {}  # window -> FlexAttention BlockMask, filled by build_attention_masks on CUDA
        self.kernels = {"full": "sdpa", "window": "dense"}  # attention kernel per kind of layer (CUDA: chosen)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.value_embeds = nn.ModuleDict({
            str(i): nn.Embedding(config.vocab_size, config.n_embd)
            for i in range(config.n_layer) if has_value_embedding(i, config.n_layer)})
        self.blocks = nn.ModuleList([Block(config, i) for i in range(config.n_layer)])
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
        self.x0_lambdas = nn.Parameter(torch.full((config.n_layer,), 0.1))
        cos, sin = self.rotary_tables()
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def rotary_tables(self):
        """cos/sin (1, T, 1, head_dim/2) in bf16 for angles position / 10000^(2i/head_dim).

        Written as the original writes it: 10000 ** (-2i/d) rounds differently in fp32 and moves 229 of
        the 262,144 bf16 entries at the defaults by one step."""
        head_dim = self.config.n_embd // self.config.n_head
        inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        angles = torch.outer(torch.arange(self.config.sequence_len, dtype=torch.float32), inv_freq)
        return angles.cos().bfloat16()[None, :, None, :], angles.sin().bfloat16()[None, :, None, :]

    @torch.no_grad()
    def init_weights(self):
        """Initialize every parameter as the baseline does (after to_empty from the meta device)."""
        bound = 3**0.5 * self.config.n_embd**-0.5
        nn.init.normal_(self.wte.weight, mean=0.0, std=1.0)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        for ve in self.value_embeds.values():
            nn.init.uniform_(ve.weight, -bound, bound)
        for block in self.blocks:
            for linear in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                nn.init.uniform_(linear.weight, -bound, bound)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
            if block.attn.ve_gate is not None:
                nn.init.zeros_(block.attn.ve_gate.weight)
        self.resid_lambdas.fill_(1.0)
        self.x0_lambdas.fill_(0.1)
        cos, sin = self.rotary_tables()
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    def build_attention_masks(self):
        """One FlexAttention block mask per sliding window size (CUDA only; CPU uses dense masks)."""
        T = self.config.sequence_len
        self.block_masks = {w: build_block_mask(w, T, self.cos.device) for w in set(self.windows) if w < T - 1}

    def num_flops_per_token(self):
        """6 x matmul params (no embeddings, no scalars) + 12 * heads * head_dim * min(window, T) per layer."""
        embedding_params = self.wte.weight.numel() + sum(p.numel() for p in self.value_embeds.parameters())
        scalar_params = self.resid_lambdas.numel() + self.x0_lambdas.numel()
        matmul_params = sum(p.numel() for p in self.parameters()) - embedding_params - scalar_params
        T = self.config.sequence_len
        attention = sum(12 * self.config.n_embd * min(w, T) for w in self.windows)
        return 6 * matmul_params + attention

    def forward(self, idx, targets=None):
        """Logits (B, T, V) (the metric computes its own cross-entropy from them), or with targets
        the mean training loss."""
        B, T = idx.shape
        assert T <= self.config.sequence_len, f"sequence of {T} tokens > model's {self.config.sequence_len}"
        cos, sin = self.cos[:, :T], self.sin[:, :T]
        x = norm(self.wte(idx))  # (B, T, C)
        x0 = x
        for i, block in enumerate(self.blocks):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None
            window = self.windows[i]
            kernel = self.kernels["full" if window >= T - 1 else "window"]
            x = block(x, ve, cos, sin, window, kernel,
                      self.block_masks.get(window) if T == self.config.sequence_len else None)
        logits = self.lm_head(norm(x)).float()  # (B, T, V), fp32 for the soft-cap and the loss
        logits = SOFTCAP * torch.tanh(logits / SOFTCAP)
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)


# ---------------------------------------------------------------------------
# Optimizer: Muon (Polar Express + NorMuon + cautious weight decay) and AdamW
# ---------------------------------------------------------------------------

# Polar Express coefficients (Amsel et al. 2025, "The Polar Express"), one (a, b, c) per iteration.
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


def polar_express(G, dtype=torch.bfloat16):
    """Approximately orthogonalize a stack of matrices (..., rows, cols), iterating in `dtype`."""
    X = G.to(dtype)
    transposed = X.size(-2) > X.size(-1)
    if transposed:  # iterate on the smaller Gram matrix
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.02 + 1e-6)
    for a, b, c in POLAR_EXPRESS_COEFFS:
        A = X @ X.mT
        X = a * X + (b * A + c * (A @ A)) @ X
    return X.mT if transposed else X


def normuon(g, second_moment, beta):
    """NorMuon: scale each row (rows >= cols) or column by 1/sqrt of its EMA'd mean square, keeping ||g||_F."""
    reduce_dim = -1 if g.size(-2) >= g.size(-1) else -2
    g = g.float()
    second_moment.lerp_(g.square().mean(dim=reduce_dim, keepdim=True), 1 - beta)
    scaled = g * second_moment.clamp_min(1e-10).rsqrt()
    ratio = g.norm(dim=(-2, -1), keepdim=True) / scaled.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-10)
    return scaled * ratio


def cautious_update(p, g, lr, wd):
    """p <- p - lr * (g + wd * p * [g * p >= 0]): decay only where the update agrees in sign."""
    p.sub_(lr * (g + wd * p * (g * p >= 0)))


def muon_step(params, grads, momentum_buffer, second_moment, momentum, lr, wd, beta):
    """One Muon step for same-shape matrices, stacked; scalars are 0-d tensors (no recompiles)."""
    g = torch.stack(grads)
    momentum_buffer.lerp_(g, 1 - momentum)
    g = g.lerp(momentum_buffer, momentum)  # Nesterov-style look-ahead
    # bf16 on GPU for speed; fp32 on CPU, where bf16 matmuls are slower, not faster
    g = normuon(polar_express(g, torch.bfloat16 if g.is_cuda else torch.float32), second_moment, beta)
    p = torch.stack(params)
    cautious_update(p, g.to(p.dtype), lr, wd)
    for param, new in zip(params, p.unbind(0)):
        param.copy_(new)


def adamw_step(params, grads, exp_avgs, exp_avg_sqs, step, lr, beta1, beta2, eps):
    """One AdamW step (no weight decay) over lists of tensors; scalars are 0-d tensors."""
    bias1, bias2 = 1 - beta1**step, 1 - beta2**step
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
        g = g.float()
        m.lerp_(g, 1 - beta1)
        v.lerp_(g.square(), 1 - beta2)
        p.sub_(((lr / bias1) * m / ((v / bias2).sqrt() + eps)).to(p.dtype))


class MuonAdamW:
    """Muon for the block matrices (grouped by shape), AdamW for embeddings, lm_head and scalars."""

    def __init__(self, model, compile_steps):
        dim_scale = (model.config.n_embd / 768) ** -0.5
        adam_groups = [
            ([model.wte.weight], EMBEDDING_LR * dim_scale, ADAM_BETAS),
            (list(model.value_embeds.parameters()), VALUE_EMBEDDING_LR * dim_scale, ADAM_BETAS),
            ([model.lm_head.weight], UNEMBEDDING_LR * dim_scale, ADAM_BETAS),
            ([model.resid_lambdas], RESID_LAMBDA_LR, ADAM_BETAS),
            ([model.x0_lambdas], X0_LAMBDA_LR, X0_LAMBDA_BETAS),
        ]
        self.adam_groups = [self.scalars(params=params, base_lr=lr, beta1=b1, beta2=b2, eps=ADAM_EPS, step=0.0,
                                         exp_avgs=[torch.zeros_like(p, dtype=torch.float32) for p in params],
                                         exp_avg_sqs=[torch.zeros_like(p, dtype=torch.float32) for p in params])
                            for params, lr, (b1, b2) in adam_groups if params]
        by_shape = {}
        for p in model.blocks.parameters():
            by_shape.setdefault(tuple(p.shape), []).append(p)
        self.muon_groups = []
        for (rows, cols), params in by_shape.items():
            moment_shape = (len(params), rows, 1) if rows >= cols else (len(params), 1, cols)
            self.muon_groups.append(self.scalars(
                params=params, base_lr=MATRIX_LR * max(1.0, rows / cols) ** 0.5, momentum=0.0, wd=0.0,
                beta=NORMUON_BETA, momentum_buffer=torch.zeros(len(params), rows, cols, device=params[0].device),
                second_moment=torch.zeros(moment_shape, device=params[0].device)))
        covered = sum(len(g["params"]) for g in self.adam_groups + self.muon_groups)
        assert covered == len(list(model.parameters())), "every parameter must be in exactly one optimizer group"
        options = dict(dynamic=False, fullgraph=True)
        self.adamw_fn = torch.compile(adamw_step, **options) if compile_steps else adamw_step
        self.muon_fn = torch.compile(muon_step, **options) if compile_steps else muon_step

    @staticmethod
    def scalars(**group):
        """A group dict whose float hyperparameters also live in 0-d tensors (`<name>_t`) beside the params:
        the compiled steps read them as inputs, so a new value is a tiny fill, not a recompile."""
        device = group["params"][0].device
        for name in [k for k, v in group.items() if isinstance(v, float) and k != "base_lr"]:
            group[name + "_t"] = torch.tensor(group[name], dtype=torch.float32, device=device)
        group["lr_t"] = torch.tensor(group["base_lr"], dtype=torch.float32, device=device)
        return group

    @torch.no_grad()
    def step(self, lr_multiplier, muon_momentum, weight_decay):
        for g in self.adam_groups:
            g["step_t"].add_(1)
            g["lr_t"].fill_(g["base_lr"] * lr_multiplier)
            self.adamw_fn(g["params"], [p.grad for p in g["params"]], g["exp_avgs"], g["exp_avg_sqs"],
                          g["step_t"], g["lr_t"], g["beta1_t"], g["beta2_t"], g["eps_t"])
        for g in self.muon_groups:
            g["lr_t"].fill_(g["base_lr"] * lr_multiplier)
            g["momentum_t"].fill_(muon_momentum)
            g["wd_t"].fill_(weight_decay)
            self.muon_fn(g["params"], [p.grad for p in g["params"]], g["momentum_buffer"], g["second_moment"],
                         g["momentum_t"], g["lr_t"], g["wd_t"], g["beta_t"])


# ---------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------

def lr_multiplier(progress):
    """1.0 after an optional warm-up, then linear warm-down to FINAL_LR_FRAC over the last WARMDOWN_RATIO."""
    if progress < WARMUP_RATIO:
        return (progress + 1e-8) / WARMUP_RATIO
    if progress < 1.0 - WARMDOWN_RATIO:
        return 1.0
    remaining = (1.0 - progress) / WARMDOWN_RATIO
    return remaining + (1.0 - remaining) * FINAL_LR_FRAC


def muon_momentum(step):
    frac = min(step / MUON_MOMENTUM_RAMP_STEPS, 1.0)
    return (1 - frac) * MUON_MOMENTUM_START + frac * MUON_MOMENTUM_END


def muon_weight_decay(progress):
    return WEIGHT_DECAY * (1.0 - progress)


# ---------------------------------------------------------------------------
# Device checks
# ---------------------------------------------------------------------------

def estimate_memory_bytes(num_params, config, tokens_per_micro_step):
    """Rough peak training memory: 16 B/param (fp32 weights, grads, optimizer state) plus per-token
    activations (fp32 logits + their gradient, ~28 B per layer per channel), calibrated on the
    reference run's 45,060 MB peak at the defaults. Each run's device batch is fitted with it: keep
    it true when the model changes, or a run that outgrows its GPU runs out of memory once (the
    driver then runs it again at half the device batch)."""
    per_token = 8 * config.vocab_size + 28 * config.n_layer * config.n_embd
    return 16 * num_params + tokens_per_micro_step * per_token


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------

def configure_cuda():
    torch.set_float32_matmul_precision("high")
    # One compile per optimizer group shape (~9 at the defaults; Dynamo's default limit is 8). With
    # fullgraph=True, going past the limit is a hard error, not a fallback to eager.
    torch._dynamo.config.recompile_limit = 32


def build_model(vocab_size, device):
    """GPT with fresh weights on `device`: (model to call, raw model). On CUDA the embeddings are
    stored in bf16, the attention block masks built and the model compiled. The driver's check of a
    run builds the model with this too (train.py imported, main() not run), then loads the weights
    the run saved before it was scored."""
    cuda = device.type == "cuda"
    if cuda:
        configure_cuda()
    with torch.device("meta"):
        raw_model = GPT(make_config(vocab_size))
    raw_model.to_empty(device=device)
    raw_model.init_weights()
    if cuda:
        raw_model.wte.to(dtype=torch.bfloat16)
        raw_model.value_embeds.to(dtype=torch.bfloat16)
        raw_model.build_attention_masks()
        head_dim, capability = raw_model.config.n_embd // raw_model.config.n_head, torch.cuda.get_device_capability()
        raw_model.kernels, passed_over = choose_attention_kernels(
            capability, lambda kernel, path: check_attention_kernel(kernel, path, head_dim, device))
        note = f"; passed over: {'; '.join(passed_over)}" if passed_over else ""
        print(f"attention (compute capability {capability[0]}.{capability[1]}): full context "
              f"{raw_model.kernels['full']}, sliding window {raw_model.kernels['window']}{note}", flush=True)
    return (torch.compile(raw_model, dynamic=False) if cuda else raw_model), raw_model


def main():
    torch.manual_seed(SEED)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()

    tokenizer = Tokenizer.from_directory()
    # The device batch is fitted to this GPU's free memory before the model takes any (counted on the
    # meta device): TOTAL_BATCH_SIZE is kept through gradient accumulation, so numbers stay comparable.
    config = make_config(tokenizer.get_vocab_size())
    with torch.device("meta"):
        num_params = sum(p.numel() for p in GPT(config).parameters())
    device_batch, grad_accum_steps = fit_device_batch(
        DEVICE_BATCH_SIZE, TOTAL_BATCH_SIZE, lambda rows: estimate_memory_bytes(num_params, config, rows * MAX_SEQ_LEN))

    model, raw_model = build_model(tokenizer.get_vocab_size(), device)
    flops_per_token = raw_model.num_flops_per_token()
    peak_flops = 0.0
    if cuda:
        device_name = torch.cuda.get_device_name()
        peak_flops = gpu_peak_flops(device_name)
        print(f"device: {device_name}, peak bf16 {peak_flops / 1e12:.1f} TFLOP/s")
        if peak_flops == 0:
            print(f"note: {device_name!r} is not in GPU_PEAK_FLOPS, so MFU is reported as 0")
    else:
        print("device: cpu (no CUDA): fp32, eager, slow; MFU and peak VRAM are reported as 0")
    optimizer = MuonAdamW(raw_model, compile_steps=cuda)
    print(f"seed: {SEED}, params: {num_params / 1e6:.1f}M, FLOPs/token: {flops_per_token / 1e6:.1f}M, "
          f"dim {config.n_embd}, heads {config.n_head}, windows {raw_model.windows}")
    print(f"settings: max_seq_len {MAX_SEQ_LEN}, time_budget {TIME_BUDGET}s, eval_tokens {EVAL_TOKENS}, "
          f"batch {TOTAL_BATCH_SIZE} tokens = {grad_accum_steps} x {device_batch} x {MAX_SEQ_LEN}")

    train_loader = make_dataloader(tokenizer, device_batch, MAX_SEQ_LEN, "train")
    x, y, epoch = next(train_loader)

    # The host runs one step ahead of the device: it reads step s-1's loss and time (an event that
    # has already fired) while step s is queued, so no step waits for a host round trip. Progress (LR,
    # weight decay, the stop) therefore lags one step behind the original's: one step more is trained.
    if cuda:
        def mark():
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event

        def seconds_between(start, end):
            end.synchronize()
            return start.elapsed_time(end) / 1000
    else:
        mark = time.perf_counter

        def seconds_between(start, end):
            return end - start
    loss_host = torch.zeros(2, pin_memory=cuda)  # two slots: step s writes s % 2 while s-1's is read
    stats = dict(training_seconds=0.0, warmup_seconds=0.0, smooth_loss=0.0)

    def finish_step(step, start, end, lrm, epoch):
        """Wait for `step` to end on the device, then check its loss, count its time, print progress."""
        dt = seconds_between(start, end)
        loss = loss_host[step % 2].item()
        if math.isnan(loss) or loss > 100:
            print(f"\nFAIL: training loss {loss} at step {step}")
            sys.exit(1)
        stats["training_seconds" if step >= WARMUP_STEPS else "warmup_seconds"] += dt
        stats["smooth_loss"] = 0.9 * stats["smooth_loss"] + 0.1 * loss
        smooth = stats["smooth_loss"] / (1 - 0.9 ** (step + 1))
        done = 100 * min(stats["training_seconds"] / TIME_BUDGET, 1.0)
        tok_per_sec = TOTAL_BATCH_SIZE / dt
        mfu = 100 * flops_per_token * tok_per_sec / peak_flops if peak_flops else 0.0
        remaining = max(0.0, TIME_BUDGET - stats["training_seconds"])
        print(f"\rstep {step:05d} ({done:.1f}%) | loss: {smooth:.6f} | lrm: {lrm:.2f} | dt: {dt * 1000:.0f}ms | "
              f"tok/sec: {tok_per_sec:,.0f} | mfu: {mfu:.1f}% | epoch: {epoch} | remaining: {remaining:.0f}s    ",
              end="", flush=True)

    def warm_up_eval(x):
        """Compile the eval graph (no grad, logits, full and last partial batch) while uncounted."""
        eval_rows = EVAL_TOKENS // MAX_SEQ_LEN
        with torch.no_grad(), autocast:
            for rows in {min(device_batch, eval_rows), eval_rows % device_batch} - {0}:
                model(x[:rows])

    step, pending = 0, None
    startup_seconds = time.time() - T_START
    start = mark()
    while True:
        progress = min(stats["training_seconds"] / TIME_BUDGET, 1.0)
        lrm = lr_multiplier(progress)
        loss_sum = torch.zeros((), device=device)
        for _ in range(grad_accum_steps):
            with autocast:
                loss = model(x, y)
            (loss / grad_accum_steps).backward()
            loss_sum += loss.detach()
            x, y, epoch = next(train_loader)
        optimizer.step(lrm, muon_momentum(step), muon_weight_decay(progress))
        raw_model.zero_grad(set_to_none=True)
        loss_host[step % 2].copy_(loss_sum / grad_accum_steps, non_blocking=True)
        if step == 0:
            warm_up_eval(x)
        end = mark()
        if pending is not None:
            finish_step(*pending)
        pending = (step, start, end, lrm, epoch)
        start = end
        if step == 0:  # freeze what exists now; a collection otherwise stalls ~0.5 s at random
            gc.collect()
            gc.freeze()
            gc.disable()
        elif step % GC_EVERY_STEPS == 0:
            gc.collect()
        step += 1
        if step > WARMUP_STEPS and stats["training_seconds"] >= TIME_BUDGET:
            break
    finish_step(*pending)
    print()
    training_seconds = stats["training_seconds"]

    eval_start = time.time()
    with torch.no_grad(), autocast:
        val_bpb = evaluate_bpb(model, tokenizer, device_batch)
    eval_seconds = time.time() - eval_start

    counted_tokens = (step - WARMUP_STEPS) * TOTAL_BATCH_SIZE
    tokens_per_sec = counted_tokens / training_seconds
    mfu_percent = 100 * flops_per_token * tokens_per_sec / peak_flops if peak_flops else 0.0
    peak_vram_mb = torch.cuda.max_memory_allocated() / 1024**2 if cuda else 0.0
    print("---")
    print(f"val_bpb:          {val_bpb:.6f}")
    print(f"training_seconds: {training_seconds:.1f}")
    print(f"total_seconds:    {time.time() - T_START:.1f}")
    print(f"peak_vram_mb:     {peak_vram_mb:.1f}")
    print(f"mfu_percent:      {mfu_percent:.2f}")
    print(f"total_tokens_M:   {step * TOTAL_BATCH_SIZE / 1e6:.1f}")
    print(f"num_steps:        {step}")
    print(f"num_params_M:     {num_params / 1e6:.1f}")
    print(f"depth:            {DEPTH}")
    print(f"tokens_per_sec:   {tokens_per_sec:.0f}")
    print(f"seed:             {SEED}")
    print(f"max_seq_len:      {MAX_SEQ_LEN}")
    print(f"time_budget:      {TIME_BUDGET}")
    print(f"eval_tokens:      {EVAL_TOKENS}")
    print(f"device_batch:     {device_batch}")
    print(f"grad_accum_steps: {grad_accum_steps}")
    # where total_seconds - training_seconds goes: start-up (imports, model, data), steps 0..10, the metric
    print(f"startup_seconds:  {startup_seconds:.1f}")
    print(f"warmup_seconds:   {stats['warmup_seconds']:.1f}")
    print(f"eval_seconds:     {eval_seconds:.1f}")


if __name__ == "__main__":
    main()
