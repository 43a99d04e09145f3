"""ClimbMix download against a real HTTP server on 127.0.0.1 serving parquet shards written here."""

import collections
import io
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import prepare
from conftest import SAMPLE_DIR

VAL = "shard_06542.parquet"


def shard_bytes(name):
    """A small real parquet shard with a `text` column."""
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": [f"{name} document {i}. " * 20 for i in range(50)]}), buf)
    return buf.getvalue()


class ShardServer:
    """Serves shard_bytes(name) for any shard; `plan[name]` lists misbehaviours for the first
    requests ("500": an error status, "drop": the full Content-Length then half the body and a
    closed connection, "short": half the body as if it were all of it, "404"); `requests`
    counts requests per name."""

    def __init__(self):
        self.plan, self.requests = collections.defaultdict(list), collections.Counter()
        self.bodies = {}  # name -> parquet bytes to serve instead of shard_bytes(name)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                server.requests[name] += 1
                action = server.plan[name].pop(0) if server.plan[name] else "ok"
                if action in ("500", "404"):
                    self.send_error(int(action))
                    return
                body = server.bodies.get(name) or shard_bytes(name)
                if action == "short":
                    body = body[:len(body) // 2]
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if action == "drop":
                    self.wfile.write(body[:len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/data"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()


@pytest.fixture
def server(tmp_path, monkeypatch):
    s = ShardServer()
    monkeypatch.setattr(prepare, "CACHE_DIR", tmp_path / "cache")
    monkeypatch.setattr(prepare, "DATA_URL", s.url)
    monkeypatch.setattr(prepare, "DOWNLOAD_BACKOFF_S", 0.001)
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


def data_dir(tmp_path):
    return tmp_path / "cache" / "data"


def assert_complete(tmp_path, names):
    files = sorted(p.name for p in data_dir(tmp_path).iterdir())
    assert files == sorted(names)  # no *.tmp or partial file left behind
    for name in names:
        assert (data_dir(tmp_path) / name).read_bytes() == shard_bytes(name)


def test_downloads_train_shards_and_the_pinned_val_shard(server, tmp_path, capsys):
    source = prepare.download_climbmix(3)
    names = ["shard_00000.parquet", "shard_00001.parquet", "shard_00002.parquet", VAL]
    assert [p.name for p in source["train"]] == names[:3] and [p.name for p in source["val"]] == [VAL]
    assert_complete(tmp_path, names)
    assert "downloading: 4/4 shards" in capsys.readouterr().err  # the progress display


def test_transient_server_error_is_retried(server, tmp_path):
    server.plan["shard_00000.parquet"] = ["500", "500"]
    prepare.download_climbmix(1)
    assert server.requests["shard_00000.parquet"] == 3
    assert_complete(tmp_path, ["shard_00000.parquet", VAL])


def test_connection_dropped_mid_body_is_retried_without_a_partial_file(server, tmp_path):
    server.plan[VAL] = ["drop", "drop"]
    prepare.download_climbmix(1)
    assert server.requests[VAL] == 3
    assert_complete(tmp_path, ["shard_00000.parquet", VAL])


def test_truncated_response_is_never_renamed_into_place(server, tmp_path):
    # The server itself sends a cut file with a matching Content-Length: only opening it as
    # parquet before the rename can tell.
    server.plan["shard_00000.parquet"] = ["short"]
    prepare.download_climbmix(1)
    assert server.requests["shard_00000.parquet"] == 2
    assert_complete(tmp_path, ["shard_00000.parquet", VAL])


def test_shard_that_keeps_failing_leaves_nothing_behind(server, tmp_path):
    server.plan[VAL] = ["drop"] * prepare.DOWNLOAD_ATTEMPTS
    with pytest.raises(SystemExit) as exit_info:
        prepare.download_climbmix(1)
    assert server.requests[VAL] == prepare.DOWNLOAD_ATTEMPTS
    assert VAL in str(exit_info.value) and "--data" in str(exit_info.value)
    assert not (data_dir(tmp_path) / VAL).exists()
    assert not list(data_dir(tmp_path).glob("*.tmp"))


def test_complete_shards_are_not_fetched_again(server, tmp_path):
    prepare.download_climbmix(2)
    assert sum(server.requests.values()) == 3
    prepare.download_climbmix(3)
    assert server.requests == {"shard_00000.parquet": 1, "shard_00001.parquet": 1,
                               "shard_00002.parquet": 1, VAL: 1}


def test_corrupt_or_truncated_existing_shard_is_replaced(server, tmp_path, capsys):
    data_dir(tmp_path).mkdir(parents=True)
    (data_dir(tmp_path) / "shard_00000.parquet").write_bytes(b"not parquet at all")
    (data_dir(tmp_path) / VAL).write_bytes(shard_bytes(VAL)[:-100])
    prepare.download_climbmix(1)
    assert server.requests == {"shard_00000.parquet": 1, VAL: 1}
    assert_complete(tmp_path, ["shard_00000.parquet", VAL])
    assert "shard_00000.parquet is incomplete or unreadable" in capsys.readouterr().out


def test_missing_shard_is_not_retried(server):
    server.plan["shard_00000.parquet"] = ["404"]
    with pytest.raises(SystemExit, match="HTTP 404; check AUTORESEARCH_DATA_URL"):
        prepare.download_climbmix(1)
    assert server.requests["shard_00000.parquet"] == 1


def test_unreachable_server_ends_with_one_clear_line(tmp_path, monkeypatch, capsys):
    with socket.socket() as s:  # a port on which nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(prepare, "CACHE_DIR", tmp_path / "cache")
    monkeypatch.setattr(prepare, "DATA_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(prepare, "DOWNLOAD_BACKOFF_S", 0.001)
    with pytest.raises(SystemExit) as exit_info:
        prepare.main([])
    message = str(exit_info.value)
    assert "\n" not in message and message.startswith("error: cannot download shard_")
    assert "cannot connect" in message and "python prepare.py --data PATH" in message
    assert not (tmp_path / "cache" / "tokenizer").exists()


def test_num_shards_out_of_range(server):
    with pytest.raises(SystemExit, match="--num-shards must be between 1 and 6542"):
        prepare.main(["--num-shards", "0"])


def test_default_source_end_to_end(server, tmp_path, capsys):
    # ClimbMix's path through prepare.main: shards made of the sample's documents, used as they are.
    def docs(*names):
        return [d for n in names for d in prepare.split_documents((SAMPLE_DIR / n).read_text())]

    def parquet(texts):
        buf = io.BytesIO()
        pq.write_table(pa.table({"text": texts}), buf)
        return buf.getvalue()

    shard0, shard1, val = docs("hamlet.txt", "paradise_lost.txt"), docs("as_you_like_it.txt"), \
        docs("comedy_of_errors.txt")
    server.bodies = {"shard_00000.parquet": parquet(shard0), "shard_00001.parquet": parquet(shard1),
                     VAL: parquet(val)}
    prepare.main(["--num-shards", "1"])
    tokenizer = prepare.Tokenizer.from_directory()
    tokens, offsets = prepare.load_tokens("val", tokenizer)
    assert len(offsets) - 1 == len(val) and tokenizer.decode(tokens[1:offsets[1]]) == val[0]
    assert len(prepare.load_tokens("train", tokenizer)[1]) - 1 == len(shard0)
    capsys.readouterr()
    prepare.main(["--num-shards", "1"])  # nothing to do: no request, no work
    out = capsys.readouterr().out
    assert sum(server.requests.values()) == 2 and "downloading" not in out
    assert "tokenizer: up to date" in out and "train tokens: up to date" in out
    prepare.main(["--num-shards", "2"])  # one more shard: fetched alone; the tokenizer saw all
    assert server.requests["shard_00001.parquet"] == 1 and sum(server.requests.values()) == 3
    assert "retraining" in capsys.readouterr().out  # of shard 0 before, so it is trained again
    tokenizer = prepare.Tokenizer.from_directory()
    assert len(prepare.load_tokens("train", tokenizer)[1]) - 1 == len(shard0) + len(shard1)
