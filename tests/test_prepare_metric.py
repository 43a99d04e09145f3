"""The fixed metric evaluate_bpb, against references computed independently of prepare.py's code."""

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO_ROOT

T = 1024         # MAX_SEQ_LEN for these tests: rows hold whole documents and crops
N_ROWS = 13      # EVAL_TOKENS // T: a prime, so batch sizes 3 and 7 end with a partial batch;
                 # 13 rows are more than one pass over the 9 val documents of the sample


@pytest.fixture
def small_eval(prepared, monkeypatch):
    monkeypatch.setattr(prepared, "MAX_SEQ_LEN", T)
    monkeypatch.setattr(prepared, "EVAL_TOKENS", T * N_ROWS + T // 2)  # the remainder is not scored
    return prepared


def first_val_rows(prepare):
    """The first N_ROWS val rows, read straight from the token files: the best-fit rule on the
    real lengths in stored order (every val document here is shorter than the pool)."""
    tokenizer = prepare.Tokenizer.from_directory()
    tokens, offsets = prepare.load_tokens("val", tokenizer)
    lengths = np.diff(offsets).tolist()
    assert len(lengths) < prepare.POOL_DOCS
    rows, pool = [], []
    while len(rows) < N_ROWS:
        row, space = [], T + 1
        while space:
            pool = pool or list(range(len(lengths)))  # a new pass over the val documents
            fits = [d for d in pool if lengths[d] <= space]
            doc = max(fits, key=lengths.__getitem__) if fits else min(pool, key=lengths.__getitem__)
            take = min(lengths[doc], space)
            row.append(tokens[offsets[doc]:offsets[doc] + take])
            pool.remove(doc)
            space -= take
        rows.append(np.concatenate(row).astype(np.int64))
    rows = torch.from_numpy(np.stack(rows))
    return rows[:, :-1], rows[:, 1:], tokenizer


def byte_lengths(tokenizer):
    """Byte length of each token from the tiktoken encoding itself; special tokens count 0."""
    enc = tokenizer.enc
    specials = {enc.encode_single_token(s) for s in enc.special_tokens_set}
    return torch.tensor([0 if i in specials else len(enc.decode_single_token_bytes(i))
                         for i in range(enc.n_vocab)])


class UniformModel(torch.nn.Module):
    """Predicts every token with probability 1/V: the per-token loss is ln V."""

    def forward(self, x):
        assert not torch.is_grad_enabled()
        return torch.zeros(*x.shape, 8192)


class TokenDependentModel(torch.nn.Module):
    """Logits that depend on the input token and the vocabulary entry: the cross-entropy then
    depends on input and target, so rows must line up exactly. Causal (position by position)."""

    def forward(self, x):
        return ((x[..., None] * 31 + torch.arange(8192)) % 97).float() / 10


def test_uniform_model_scores_log2_vocab_times_tokens_per_byte(small_eval):
    _, y, tokenizer = first_val_rows(small_eval)
    nbytes = byte_lengths(tokenizer)[y]
    scored_tokens, total_bytes = int((nbytes > 0).sum()), int(nbytes.sum())
    assert 0 < scored_tokens < y.numel()  # BOS targets exist and are not scored
    expected = math.log2(8192) * scored_tokens / total_bytes
    assert small_eval.evaluate_bpb(UniformModel(), tokenizer, 4) == pytest.approx(expected, rel=1e-6)


def test_special_tokens_count_neither_tokens_nor_bytes(small_eval):
    _, y, tokenizer = first_val_rows(small_eval)
    bos = tokenizer.get_bos_token_id()
    assert small_eval.get_token_bytes()[bos] == 0

    class NeverBos(torch.nn.Module):  # BOS targets cost ~30 nats each; they must not count
        def forward(self, x):
            logits = torch.zeros(*x.shape, 8192)
            logits[..., bos] = -30.0
            return logits

    nbytes = byte_lengths(tokenizer)[y]
    expected = math.log(8191 + math.exp(-30)) / math.log(2) * int((nbytes > 0).sum()) / int(nbytes.sum())
    assert small_eval.evaluate_bpb(NeverBos(), tokenizer, 5) == pytest.approx(expected, rel=1e-6)


def test_token_bytes_table_matches_the_encoding(prepared):
    tokenizer = prepared.Tokenizer.from_directory()
    table = prepared.get_token_bytes()
    assert table.shape == (prepared.VOCAB_SIZE,) == (tokenizer.get_vocab_size(),)
    assert torch.equal(table.long(), byte_lengths(tokenizer))
    assert (table[-4:] == 0).all() and (table[:-4] > 0).all()


def test_metric_is_exact_and_independent_of_batch_size(small_eval):
    x, y, tokenizer = first_val_rows(small_eval)
    model = TokenDependentModel()
    nbytes = byte_lengths(tokenizer)[y].reshape(-1)
    loss = torch.nn.functional.cross_entropy(model(x).double().flatten(0, 1), y.flatten(), reduction="none")
    expected = loss[nbytes > 0].sum().item() / (math.log(2) * nbytes.sum().item())
    results = [small_eval.evaluate_bpb(model, tokenizer, b) for b in (1, 3, 7, 7, 13, 64)]
    assert results[0] == pytest.approx(expected, rel=1e-6)  # fp32 cross-entropy vs a float64 reference
    assert len(set(results)) == 1  # identical for every batch size, and on a second call


def test_metric_refuses_eval_tokens_below_one_row(small_eval, monkeypatch):
    monkeypatch.setattr(small_eval, "EVAL_TOKENS", T - 1)
    with pytest.raises(SystemExit, match="EVAL_TOKENS"):
        small_eval.evaluate_bpb(UniformModel(), small_eval.Tokenizer.from_directory(), 2)


def test_constants_and_their_environment_overrides(tmp_path):
    code = ("import prepare as p; print(p.MAX_SEQ_LEN, p.TIME_BUDGET, p.EVAL_TOKENS, p.VOCAB_SIZE, "
            "p.SEED, p.CACHE_DIR, p.DATA_URL)")
    run = lambda env: subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env,  # noqa: E731
                                     capture_output=True, text=True)
    default = run({"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}).stdout.split()
    assert default[:5] == ["2048", "300", str(40 * 524288), "8192", "42"]
    assert default[5] == str(tmp_path / ".cache" / "autoresearch")
    assert default[6] == "https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "AUTORESEARCH_MAX_SEQ_LEN": "64",
           "AUTORESEARCH_TIME_BUDGET": "5", "AUTORESEARCH_EVAL_TOKENS": "640",
           "AUTORESEARCH_SEED": "7", "AUTORESEARCH_CACHE": str(tmp_path / "c"),
           "AUTORESEARCH_DATA_URL": "http://127.0.0.1:1/x"}
    assert run(env).stdout.split() == ["64", "5", "640", "8192", "7", str(tmp_path / "c"),
                                       "http://127.0.0.1:1/x"]
    bad = run({**env, "AUTORESEARCH_EVAL_TOKENS": "lots"})
    assert bad.returncode == 1
    assert bad.stderr.strip() == "error: AUTORESEARCH_EVAL_TOKENS='lots' must be a positive whole number"


# ---------------------------------------------------------------------------
# The cross-entropy from logits, and the causality probe, on train.py's own model
# ---------------------------------------------------------------------------

def old_evaluate_bpb(prepare, model, tokenizer, batch_size):
    """The metric before issue 9, verbatim but for the call: it trusted the model's own per-token
    losses, model(x, y, reduction="none")."""
    n_rows = prepare.EVAL_TOKENS // prepare.MAX_SEQ_LEN
    loader = prepare.make_dataloader(tokenizer, batch_size, prepare.MAX_SEQ_LEN, "val")
    token_bytes = prepare.get_token_bytes("cpu")
    total_nats = torch.zeros((), dtype=torch.float64)
    total_bytes = torch.zeros((), dtype=torch.float64)
    for done in range(0, n_rows, batch_size):
        x, y, _ = next(loader)
        x, y = x[:n_rows - done], y[:n_rows - done]
        loss = model(x, y, reduction="none").reshape(-1)
        nbytes = token_bytes[y.reshape(-1)]
        total_nats += torch.where(nbytes > 0, loss.double(), 0.0).sum()
        total_bytes += nbytes.sum()
    return (total_nats / (math.log(2) * total_bytes)).item()


@pytest.fixture
def gpt(small_eval, monkeypatch):
    """train.py's model, small (2 layers, dim 64), weights scaled up so the logits say something."""
    import train
    for name, value in (("DEPTH", 2), ("ASPECT_RATIO", 32), ("HEAD_DIM", 32)):
        monkeypatch.setattr(train, name, value)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = train.GPT(train.make_config(8192, T))
    model.to_empty(device="cpu")
    model.init_weights()
    with torch.no_grad():  # as after some training: the output projections start at zero
        model.lm_head.weight.normal_(0, 0.05)
        for block in model.blocks:
            block.attn.c_proj.weight.normal_(0, 0.1)
            block.mlp.c_proj.weight.normal_(0, 0.02)
    return train, model


def test_metric_from_logits_equals_the_models_own_per_token_losses(small_eval, gpt):
    train, model = gpt

    class OwnLoss(torch.nn.Module):  # the per-token losses train.py's loss code used to return
        def forward(self, x, y, reduction):
            logits = model(x)
            return torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1),
                                                     ignore_index=-1, reduction=reduction)

    tokenizer = small_eval.Tokenizer.from_directory()
    with torch.no_grad():
        old = old_evaluate_bpb(small_eval, OwnLoss(), tokenizer, 4)
    new = small_eval.evaluate_bpb(model, tokenizer, 4)
    assert 1.0 < new < 20 and new == pytest.approx(old, rel=1e-6)


def test_the_causality_probe_passes_the_baseline_and_refuses_leaky_attention(small_eval, gpt, monkeypatch):
    train, model = gpt
    tokenizer = small_eval.Tokenizer.from_directory()
    assert small_eval.evaluate_bpb(model, tokenizer, 4) > 0  # the causal baseline passes
    causal = train.causal_attention

    def bidirectional(q, k, v, window, kernel="sdpa", block_mask=None):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    def sees_the_next_key(q, k, v, window, kernel="sdpa", block_mask=None):  # an off-by-one window mask
        pos = torch.arange(q.size(-2))
        offset = pos[:, None] - pos[None, :]
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=(offset >= -1) & (offset <= window))

    for leaky in (bidirectional, sees_the_next_key):
        monkeypatch.setattr(train, "causal_attention", leaky)
        with pytest.raises(SystemExit, match="the model's output at position \\d+ depends on later tokens"):
            small_eval.evaluate_bpb(model, tokenizer, 4)
    monkeypatch.setattr(train, "causal_attention", causal)
    assert small_eval.evaluate_bpb(model, tokenizer, 4) > 0


def test_a_model_that_returns_no_logits_is_told_what_the_metric_needs(small_eval):
    class LossOnly(torch.nn.Module):
        def forward(self, x):
            return torch.zeros(x.numel())

    with pytest.raises(SystemExit, match=r"model\(x\) must return logits of shape \(B, T, vocab\)"):
        small_eval.evaluate_bpb(LossOnly(), small_eval.Tokenizer.from_directory(), 4)


def test_a_causal_model_with_nondeterministic_kernels_passes_the_probe(small_eval):
    """Logits that jitter from call to call (atomics, split-K) but never read the future."""
    class Jittery(torch.nn.Module):
        def forward(self, x):
            return ((x[..., None] * 31 + torch.arange(8192)) % 97).float() / 10 + 0.01 * torch.randn(*x.shape, 8192)

    assert small_eval.evaluate_bpb(Jittery(), small_eval.Tokenizer.from_directory(), 4) > 0
