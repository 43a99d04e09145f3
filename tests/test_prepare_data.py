"""Local corpora, the tokenizer, the token files and their provenance (prepare.py --data)."""

import json
import re
import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import prepare
from conftest import REPO_ROOT, SAMPLE_DIR

SENTENCES = " ".join(f"Sentence number {i} says something about item {i * 7}." for i in range(900))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache for this test."""
    monkeypatch.setattr(prepare, "CACHE_DIR", tmp_path / "cache")
    return tmp_path / "cache"


@pytest.fixture
def own_prepared(prepared_cache, tmp_path, monkeypatch):
    """A private copy of the prepared sample cache, for tests that change it."""
    shutil.copytree(prepared_cache, tmp_path / "cache")
    monkeypatch.setattr(prepare, "CACHE_DIR", tmp_path / "cache")
    return tmp_path / "cache"


def mtimes(cache):
    return {p.relative_to(cache).as_posix(): p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()}


# ---------------------------------------------------------------------------
# Documents
# ---------------------------------------------------------------------------


def test_short_paragraphs_are_grouped_up_to_the_limit():
    paragraphs = [f"Paragraph {i}.\nIts second line." * (1 + i % 5) for i in range(400)]
    docs = prepare.split_documents("\n\n".join(paragraphs) + "\n")
    assert all(len(d) <= prepare.DOC_CHARS for d in docs)
    assert "\n\n".join(docs) == "\n\n".join(paragraphs)  # nothing lost, order kept, not cut mid-paragraph
    assert len(docs) < len(paragraphs) / 10  # grouped
    # each document is as full as the next paragraph allows
    for doc, nxt in zip(docs, docs[1:]):
        assert len(doc) + 2 + len(nxt.split("\n\n")[0]) > prepare.DOC_CHARS


def test_one_enormous_line_is_split_at_sentence_ends():
    text = "\n\n".join([SENTENCES, "A short paragraph.", SENTENCES.replace(".", "?")])
    docs = prepare.split_documents(text)
    assert all(len(d) <= prepare.DOC_CHARS for d in docs) and len(docs) >= 2 * len(SENTENCES) // 4000
    assert all(re.search(r"[.?]$", d) for d in docs)  # every cut falls at a sentence end
    assert re.sub(r"\s+", " ", " ".join(docs)) == re.sub(r"\s+", " ", text)  # nothing lost


def test_long_lines_without_blank_lines_become_separate_documents():
    # e.g. one speech or one record per line: a cut prefers a sentence end that ends a line
    lines = [SENTENCES[i * 1000:i * 1000 + 2500].rsplit(".", 1)[0] + "." for i in range(12)]
    lines += [SENTENCES[:9000]]
    docs = prepare.split_documents("\n".join(lines))
    assert docs[:12] == lines[:12]
    assert not any("\n" in d for d in docs) and re.sub(r"\s+", " ", " ".join(docs[12:])) == lines[12]


def test_without_sentence_ends_split_at_whitespace_then_anywhere():
    words = " ".join(f"word{i}" for i in range(3000))
    docs = prepare.split_documents(words)
    assert all(len(d) <= prepare.DOC_CHARS for d in docs) and " ".join(docs) == words
    blob = "x" * 10_000
    assert prepare.split_documents(blob) == ["x" * 4000, "x" * 4000, "x" * 2000]


def test_every_format_gives_the_same_documents(tmp_path):
    text = "Title\n\n" + SENTENCES + "\n\nThe end.\n"
    (tmp_path / "a.txt").write_text(text)
    (tmp_path / "b.md").write_text(text)
    (tmp_path / "c.jsonl").write_text(json.dumps({"id": 1, "text": text}) + "\n\n")
    pq.write_table(pa.table({"text": [text]}), tmp_path / "d.parquet")
    expected = prepare.split_documents(text)
    for path in sorted(tmp_path.iterdir()):
        source = {"local": True, "train": [path], "val": [path]}
        got = {split: list(prepare.iter_documents(source, split)) for split in ("train", "val")}
        assert sorted(got["train"] + got["val"]) == sorted(expected), path.name
        assert all(prepare.split_of(d) == split for split in got for d in got[split])


def test_val_split_is_a_stable_hash_share():
    docs = [f"document {i}" for i in range(20_000)]
    val = [d for d in docs if prepare.split_of(d) == "val"]
    assert abs(len(val) / len(docs) - prepare.VAL_SHARE) < 0.01
    assert prepare.split_of("document 0") == prepare.split_of("document 0")
    pinned = [40, 70, 100, 118, 123, 129, 148, 163]  # blake2b of the text: the same on every machine
    assert [i for i in range(200) if prepare.split_of(f"document {i}") == "val"] == pinned


def test_directories_are_read_recursively_in_sorted_order(tmp_path):
    for name in ["b/z.txt", "b/a.jsonl", "a.md", ".git/x.bin", "b/.hidden.txt", "c/d/e.parquet"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    extra = tmp_path / "b" / "z.txt"
    files = prepare.list_local_files([str(tmp_path), str(extra)])
    assert [f.relative_to(tmp_path).as_posix() for f in files] == ["a.md", "b/a.jsonl", "b/z.txt",
                                                                   "c/d/e.parquet"]


# ---------------------------------------------------------------------------
# Bad input: one clear line naming the file, nothing written that a later step would trust
# ---------------------------------------------------------------------------


def bad_corpus(tmp_path, name, content):
    path = tmp_path / "corpus" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, pa.Table):
        pq.write_table(content, path)
    else:
        path.write_bytes(content)
    return path


@pytest.mark.parametrize("name, content, message", [
    ("a.txt", b"fine text\n\0\0binary", r"a\.txt: binary data \(a NUL byte at offset 10\)"),
    ("a.txt", "caf\u00e9".encode("latin-1"), r"a\.txt: not UTF-8 text \(invalid byte at offset 3\)"),
    ("a.jsonl", b'{"text": "ok"}\n\n{"body": "no text"}\n', r'a\.jsonl:3: no "text" string field'),
    ("a.jsonl", b'{"text": "ok"}\n{"text": \n', r"a\.jsonl:2: not a JSON object"),
    ("a.parquet", pa.table({"body": ["x"]}), r"a\.parquet: no 'text' column of strings \(columns: body\)"),
    ("a.parquet", pa.table({"text": [1]}), r"a\.parquet: no 'text' column of strings \(columns: text\)"),
    ("a.parquet", b"PAR1 not really", r"a\.parquet: not a readable parquet file"),
    ("a.pdf", b"%PDF", r"a\.pdf: unsupported file type"),
    ("a.txt", b"  \n\n \n", r"no text to train on in .*a\.txt: the corpus is empty"),
])
def test_bad_input_is_one_clear_line(cache, tmp_path, name, content, message):
    path = bad_corpus(tmp_path, name, content)
    for given in (path, path.parent):  # named directly or found in a folder
        with pytest.raises(SystemExit) as exit_info:
            prepare.main(["--data", str(given)])
        text = str(exit_info.value)
        assert re.search(message, text) and str(path) in text and "\n" not in text
        assert not (cache / "tokenizer" / "meta.json").exists()
        assert not (cache / "tokens").exists()


def test_damaged_parquet_pages_are_one_clear_line(cache, tmp_path):
    path = bad_corpus(tmp_path, "a.parquet", pa.table({"text": [f"doc {i} " * 50 for i in range(2000)]}))
    data = bytearray(path.read_bytes())
    data[100:2000] = b"\xff" * 1900  # the first data page; the footer stays intact
    path.write_bytes(bytes(data))
    with pytest.raises(SystemExit, match=r"a\.parquet: damaged parquet file .*; replace or delete it"):
        prepare.main(["--data", str(path)])


def test_missing_path_and_empty_folder(cache, tmp_path):
    with pytest.raises(SystemExit, match=r"--data .*nowhere: no such file or directory"):
        prepare.main(["--data", str(tmp_path / "nowhere")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match=r"no files found in .*empty"):
        prepare.main(["--data", str(tmp_path / "empty")])


def test_corpus_too_small_for_the_vocabulary(cache, tmp_path):
    path = bad_corpus(tmp_path, "tiny.txt", SENTENCES.encode())
    with pytest.raises(SystemExit, match=r"too small to learn 8192 tokens \(it gave \d+\); add more text"):
        prepare.main(["--data", str(path)])
    assert not (cache / "tokenizer" / "meta.json").exists()


def test_data_not_prepared_names_the_command(cache):
    for call in (prepare.metric_files, prepare.Tokenizer.from_directory, prepare.get_token_bytes):
        with pytest.raises(SystemExit, match="python prepare.py"):
            call()


# ---------------------------------------------------------------------------
# Tokenizer and token files
# ---------------------------------------------------------------------------


def test_tokenizer(prepared):
    tokenizer = prepared.Tokenizer.from_directory()
    assert tokenizer.get_vocab_size() == 8192 and tokenizer.get_bos_token_id() == 8188
    assert tokenizer.enc.encode_single_token("<|reserved_3|>") == 8191
    text = (SAMPLE_DIR / "hamlet.txt").read_text()[:5000] + " Grüße, 東京 🙂 12345\r\n"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text and len(ids) < len(text) / 3
    assert tokenizer.encode("<|reserved_0|>") != [8188]  # special tokens never come from text
    assert tokenizer.encode(["ab", "cd"], prepend="<|reserved_0|>") == [
        [8188] + tokenizer.encode("ab"), [8188] + tokenizer.encode("cd")]
    assert tokenizer.encode("ab", prepend=8188) == [8188] + tokenizer.encode("ab")
    spec_pattern = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++"""
                    r"""[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+""")  # copied from SPEC §2
    assert tokenizer.enc._pat_str == spec_pattern


def test_token_files_hold_every_document_once_with_bos(prepared):
    tokenizer = prepared.Tokenizer.from_directory()
    source = {"local": True, "train": [], "val": []}
    source["train"] = source["val"] = prepared.list_local_files([str(SAMPLE_DIR)])
    for split in ("train", "val"):
        tokens, offsets = prepared.load_tokens(split, tokenizer)
        docs = list(prepared.iter_documents(source, split))
        assert len(offsets) == len(docs) + 1 and offsets[-1] == len(tokens)
        for i in (0, len(docs) // 2, len(docs) - 1):
            doc = tokens[offsets[i]:offsets[i + 1]].tolist()
            assert doc[0] == 8188 and tokenizer.decode(doc[1:]) == docs[i]
        assert (tokens == 8188).sum() == len(docs)
    assert prepared.metric_files() == [
        prepared.CACHE_DIR / "tokenizer" / "tokenizer.pkl", prepared.CACHE_DIR / "tokenizer" / "token_bytes.npy",
        prepared.CACHE_DIR / "tokens" / "val.bin", prepared.CACHE_DIR / "tokens" / "val.offsets.npy"]


def test_rerun_on_prepared_data_does_nothing(own_prepared, capsys):
    before = mtimes(own_prepared)
    prepare.main(["--data", str(SAMPLE_DIR)])
    out = capsys.readouterr().out
    assert "tokenizer: up to date" in out and "val tokens: up to date" in out
    assert "train tokens: up to date" in out and mtimes(own_prepared) == before


def test_small_val_split_is_reported_plainly(own_prepared, monkeypatch, capsys):
    prepare.main(["--data", str(SAMPLE_DIR)])
    val = json.loads((own_prepared / "tokens" / "val.json").read_text())["n_tokens"]
    out = capsys.readouterr().out
    assert (f"note: evaluate_bpb scores 10,240 rows of 2048 tokens (EVAL_TOKENS=20,971,520) but one "
            f"pass over the val split ({val:,} tokens) makes only 4, so the val text is scored "
            "~2560.0 times over; for one pass set AUTORESEARCH_EVAL_TOKENS=8192, or add more text"
            in out)
    monkeypatch.setattr(prepare, "EVAL_TOKENS", 8192)  # exactly one pass: nothing to say
    prepare.main(["--data", str(SAMPLE_DIR)])
    assert "note:" not in capsys.readouterr().out


def test_interrupted_or_damaged_steps_are_redone(own_prepared, capsys):
    (own_prepared / "tokens" / "val.json").unlink()  # as if killed before the record was written
    with open(own_prepared / "tokens" / "train.bin", "r+b") as f:
        f.truncate(1000)
    (own_prepared / "tokens" / "train.bin.tmp").write_bytes(b"junk")  # a leftover is never trusted
    prepare.main(["--data", str(SAMPLE_DIR)])
    captured = capsys.readouterr()
    assert "tokenizer: up to date" in captured.out
    assert "tokenized val" in captured.err and "tokenized train" in captured.err
    tokenizer = prepare.Tokenizer.from_directory()
    assert next(prepare.make_dataloader(tokenizer, 2, 64, "train"))[0].shape == (2, 64)
    assert not (own_prepared / "tokens" / "train.bin.tmp").exists()


def test_token_files_changed_in_place_are_rebuilt(own_prepared, capsys):
    """Same size, other bytes (the driver stops on such a val file): `python prepare.py` must
    notice it by content and rebuild, so that its advice repairs the cache."""
    val, token_bytes = own_prepared / "tokens" / "val.bin", own_prepared / "tokenizer" / "token_bytes.npy"
    originals = val.read_bytes(), token_bytes.read_bytes()
    for path in (val, token_bytes):
        with open(path, "r+b") as f:
            f.seek(200)
            f.write(b"\x07\x00" * 8)
    assert (val.read_bytes(), token_bytes.read_bytes()) != originals and val.stat().st_size == len(originals[0])
    prepare.main(["--data", str(SAMPLE_DIR)])
    out = capsys.readouterr().out
    assert "val tokens: the files changed on disk since they were written; rebuilding them" in out
    assert "token_bytes.npy changed on disk; writing it again" in out and "train tokens: up to date" in out
    assert (val.read_bytes(), token_bytes.read_bytes()) == originals


def test_token_files_of_an_older_prepare_py_get_their_hashes_without_a_rebuild(own_prepared, capsys):
    meta_path = own_prepared / "tokens" / "train.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({k: v for k, v in meta.items() if k != "sha256"}))  # as written before
    prepare.main(["--data", str(SAMPLE_DIR)])
    captured = capsys.readouterr()
    assert "train tokens: up to date" in captured.out and "tokenizing train" not in captured.err
    assert json.loads(meta_path.read_text())["sha256"] == meta["sha256"]


def test_new_data_retrains_and_never_mixes_tokenizers(own_prepared, tmp_path, capsys):
    old = prepare.Tokenizer.from_directory()
    prepare.main(["--data", str(SAMPLE_DIR / "hamlet.txt")])
    assert "the training data changed" in capsys.readouterr().out
    new = prepare.Tokenizer.from_directory()
    assert new.fingerprint != old.fingerprint
    for split in ("train", "val"):
        meta = json.loads((own_prepared / "tokens" / f"{split}.json").read_text())
        assert meta["tokenizer"] == new.fingerprint
        with pytest.raises(SystemExit, match="different tokenizer|run `python prepare.py`"):
            prepare.make_dataloader(old, 2, 64, split)
    # A tokenizer swapped in behind the token files' back: refused, then repaired by a re-run.
    shutil.copy(tmp_path / "cache" / "tokenizer" / "tokenizer.pkl", tmp_path / "new.pkl")
    prepare.main(["--data", str(SAMPLE_DIR)])
    shutil.copy(tmp_path / "new.pkl", own_prepared / "tokenizer" / "tokenizer.pkl")
    swapped = prepare.Tokenizer.from_directory()
    with pytest.raises(SystemExit, match="python prepare.py"):
        prepare.make_dataloader(swapped, 2, 64, "val")
    with pytest.raises(SystemExit, match="python prepare.py"):
        prepare.metric_files()
    prepare.main(["--data", str(SAMPLE_DIR)])
    assert prepare.Tokenizer.from_directory().fingerprint == old.fingerprint  # deterministic training
    prepare.metric_files()


def test_tokenizer_read_up_to_the_char_limit_survives_added_files(cache, tmp_path, monkeypatch, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    shutil.copy(SAMPLE_DIR / "paradise_lost.txt", corpus / "a.txt")
    shutil.copy(SAMPLE_DIR / "hamlet.txt", corpus / "b.txt")
    monkeypatch.setattr(prepare, "TOKENIZER_MAX_CHARS", 300_000)
    prepare.main(["--data", str(corpus)])
    meta = json.loads((cache / "tokenizer" / "meta.json").read_text())
    assert [p for p, *_ in meta["inputs"]] == [str(corpus / "a.txt")] and not meta["complete"]
    shutil.copy(SAMPLE_DIR / "comedy_of_errors.txt", corpus / "c.txt")
    capsys.readouterr()
    prepare.main(["--data", str(corpus)])
    out, err = capsys.readouterr()
    assert "tokenizer: up to date" in out and "tokenized train" in err and "tokenized val" in err
    with open(corpus / "a.txt", "a") as f:  # a file the tokenizer read has changed
        f.write("\nOne more line.\n")
    prepare.main(["--data", str(corpus)])
    assert "retraining" in capsys.readouterr().out


def test_cli_runs_as_a_script():
    result = subprocess.run([sys.executable, "prepare.py", "--help"], cwd=REPO_ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0 and "--num-shards" in result.stdout and "--data" in result.stdout
