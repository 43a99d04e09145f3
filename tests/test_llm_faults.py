"""The LLM API's faults (issue 19), for both providers against the fake servers: a reply cut at
the length limit never applied (a notebook condensation included), an unclosed SEARCH block
named to the model, an unreachable API at start-up, the waits a server asks for (retry-after-ms,
an HTTP date), and a prompt too long for the model: shortened, the night goes on, and a
restart never sends a request of a size that was refused.
Run: python -m pytest tests/test_llm_faults.py"""

import email.utils
import json
import socket
import threading
from datetime import datetime, timedelta, timezone

import anthropic
import openai
import pytest

from driver_helpers import BASE_LINE, DRIVER_ARGS, fake, repo, rows, run_openai, server  # noqa: F401
from fake_anthropic import cut_at_max_tokens, edit
from fake_openai import cut_at_length, error, text_edit, tool_edit
from autoresearch import cli, llm, notebook

try:
    import httpx2 as httpx  # what the installed SDKs are built on
except ImportError:
    import httpx

ORDER_LINE = "DATA_ORDER = 0"
SYSTEM, TRAIN_PY = [("rules", False)], ("The current train.py:\n\nTRUE_BPB = 1.0\n" * 20, True)


def anthropic_provider(fake_server, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_BASE_URL", fake_server.url)
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test-secret")
    return cli.make_provider("anthropic", "claude-test")


def status_error(kind, status, message, headers=None, body=None):
    """A real SDK error for an HTTP answer, as the SDK raises it."""
    response = httpx.Response(status, headers=headers or {}, request=httpx.Request("POST", "http://x"))
    return kind(message, response=response, body=body)


# ---------------------------------------------------------------------------
# A reply cut at the length limit is never applied
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("provider", ["anthropic", "openai"])
def test_a_condensation_cut_at_the_length_limit_is_not_applied(repo, fake, server, monkeypatch, capsys, provider):
    monkeypatch.setattr(notebook, "NOTES_MAX_CHARS", 400)
    half = "# Research notebook\n\n## data\n- orders 3 and"
    if provider == "anthropic":
        fake.replies += [edit(f"order {k}", (ORDER_LINE, f"DATA_ORDER = {k}"), hypothesis="x" * 150, theme="data")
                         for k in (3, 4)] + [cut_at_max_tokens({"text": half}),
                                             edit("order 5", (ORDER_LINE, "DATA_ORDER = 5"), hypothesis="h", theme="data")]
        assert cli.main(["--tag", "t", *DRIVER_ARGS, "--max-experiments", "3", "--greedy"]) == 0
    else:
        openai_server = server()
        openai_server.replies += [tool_edit(f"order {k}", (ORDER_LINE, f"DATA_ORDER = {k}"), hypothesis="x" * 150,
                                            theme="data") for k in (3, 4)] + [
            cut_at_length({"text": half}), tool_edit("order 5", (ORDER_LINE, "DATA_ORDER = 5"), theme="data")]
        assert run_openai(openai_server, "--max-experiments", "3", "--greedy") == 0
    notes = (repo / "runs/t/notes.md").read_text()
    assert not notes.startswith(half) and "#1 discard" in notes and "#2 discard" in notes and "#3 discard" in notes
    assert "the condensation was cut at the length limit; not applied" in capsys.readouterr().out


def test_a_tool_call_cut_at_the_length_limit_is_not_applied_with_anthropic(repo, fake):
    fake.replies += [cut_at_max_tokens(edit("half", (BASE_LINE, "TRUE_BPB = 0.5"))),
                     edit("whole", (BASE_LINE, "TRUE_BPB = 0.990000"))]
    assert cli.main(["--tag", "t", *DRIVER_ARGS, "--max-experiments", "1", "--greedy"]) == 0
    assert [x["description"] for x in rows(repo)] == ["baseline", "whole"]
    assert "cut off at the length limit" in json.dumps(fake.requests[-1]["messages"][-1])


# ---------------------------------------------------------------------------
# An unclosed SEARCH block: said what is wrong, in the format the server takes
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("tools_refused", [True, False])
def test_an_unclosed_block_is_named_and_the_format_the_server_takes_asked_for(repo, server, tools_refused):
    openai_server = server(tools=False, reject_tools=tools_refused)  # refuses tools, or ignores them
    unclosed = {"text": f"DESCRIPTION: lower bpb\n<<<<<<< SEARCH\n{BASE_LINE}\n=======\nTRUE_BPB = 0.99\n"}
    openai_server.replies += [unclosed, text_edit("lower bpb", (BASE_LINE, "TRUE_BPB = 0.990000"))]
    assert run_openai(openai_server, "--max-experiments", "1", "--greedy") == 0
    assert [x["description"] for x in rows(repo)] == ["baseline", "lower bpb"]
    told = openai_server.requests[-1]["messages"][-1]
    assert told["role"] == "user" and "your SEARCH/REPLACE block was not closed" in told["content"]
    assert ("answer in the text format of the system prompt" in told["content"]) == tools_refused
    assert ("call the edit_train_py tool" in told["content"]) != tools_refused


# ---------------------------------------------------------------------------
# The start-up check gives up on an API it cannot reach, naming its address
# ---------------------------------------------------------------------------

def closed_port():
    """A port on 127.0.0.1 that nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raised_within(seconds, call):
    """What call() raised, run in a thread; fails the test if it still runs after `seconds`."""
    result = []

    def run():
        try:
            call()
            result.append(None)
        except BaseException as e:  # noqa: BLE001
            result.append(e)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert result, f"still retrying after {seconds} s"
    return result[0]


@pytest.mark.parametrize("provider", ["anthropic", "openai"])
def test_an_unreachable_api_stops_the_start_up_check_naming_its_address(monkeypatch, provider):
    url = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setattr(llm, "STARTUP_CHECK_S", 1.0, raising=False)  # (without the bound: retried forever)
    monkeypatch.setattr(llm, "LLM_BACKOFF_S", 0.1)
    if provider == "anthropic":
        monkeypatch.setenv("ANTHROPIC_BASE_URL", url)
        monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test-secret")
        checked = cli.make_provider("anthropic", "claude-test")
    else:
        checked = cli.make_provider("openai", "local-model", url + "/v1")
    stop = raised_within(30, checked.check_access)
    assert isinstance(stop, SystemExit), stop
    assert f"could not reach the LLM API at {url}" in str(stop) and "for 1 s" in str(stop)
    assert "connection problem" in str(stop) and "--base-url" in str(stop) and "\n" not in str(stop)


# ---------------------------------------------------------------------------
# The wait a server asks for: retry-after-ms, retry-after in seconds or as an HTTP date
# ---------------------------------------------------------------------------

def http_date(seconds_from_now):
    return email.utils.format_datetime(datetime.now(timezone.utc) + timedelta(seconds=seconds_from_now), usegmt=True)


@pytest.mark.parametrize("headers, wait_s", [
    ({"retry-after-ms": "1500", "retry-after": "9"}, 1.5),  # the milliseconds first: more precise
    ({"retry-after": "7"}, 7.0),
    ({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}, 0.0),  # a date past: no wait asked for
    ({"retry-after": "soon"}, None),
    ({}, None)])
def test_the_wait_a_server_asks_for(headers, wait_s):
    error_429 = status_error(anthropic.RateLimitError, 429, "slow down", headers)
    with pytest.raises(llm.Transient) as raised:
        llm.sort_status(error_429, "slow down", "claude-test", "ANTHROPIC_API_KEY")
    assert raised.value.args == ("HTTP 429 (slow down)", wait_s)


def test_a_retry_after_date_is_a_wait_from_now():
    error_503 = status_error(openai.InternalServerError, 503, "loading", {"retry-after": http_date(30)})
    with pytest.raises(llm.Transient) as raised:
        llm.sort_status(error_503, "loading", "local-model", "OPENAI_API_KEY")
    assert 20 < raised.value.args[1] <= 30


def test_retry_after_ms_from_the_server_is_waited(server, monkeypatch, capsys):
    monkeypatch.setattr(llm, "LLM_BACKOFF_S", 0.01)
    openai_server = server()
    openai_server.replies += [error(429, "slow down", headers={"retry-after-ms": "300"}), tool_edit("a", ("x", "y"))]
    provider = cli.make_provider("openai", "local-model", openai_server.url)
    assert llm.ask(provider, SYSTEM, [TRAIN_PY], []).call["description"] == "a"
    assert "HTTP 429 (slow down); retrying in 0.3 s" in capsys.readouterr().out


# ---------------------------------------------------------------------------
# A prompt too long for the model: shortened, never sent again at a refused size
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("message", [
    "prompt is too long: 250000 tokens > 200000 maximum",  # Anthropic
    "This model's maximum context length is 8192 tokens. However, your messages resulted in 9000 tokens.",  # vLLM
    "the request exceeds the available context size, try increasing it",  # llama.cpp
    "input length exceeds the context length",  # Ollama
    "Too many tokens: the prompt exceeds the context window"])
def test_a_prompt_too_long_is_told_apart_from_a_refusal(message):
    with pytest.raises(llm.PromptTooLong):
        llm.sort_status(status_error(anthropic.BadRequestError, 400, message), message, "m", "ANTHROPIC_API_KEY")
    with pytest.raises(llm.PromptTooLong):  # a body over the API's size limit
        llm.sort_status(status_error(anthropic.APIStatusError, 413, "request_too_large"), "request_too_large", "m", "K")
    with pytest.raises(SystemExit, match="refused the request \\(400\\)"):
        llm.sort_status(status_error(anthropic.BadRequestError, 400, "max_tokens: must be positive"),
                        "max_tokens: must be positive", "m", "ANTHROPIC_API_KEY")
    provider = cli.make_provider("openai", "local-model", "http://127.0.0.1:9/v1")
    too_big = status_error(openai.BadRequestError, 400, "Error code: 400",
                           body={"message": "Request too large", "code": "context_length_exceeded"})

    def refused():
        raise too_big
    with pytest.raises(llm.PromptTooLong):  # OpenAI's code, whatever the message says
        provider.guard(refused, lambda reply: True)


def test_a_prompt_too_long_is_shortened_and_the_night_goes_on(repo, fake, capsys):
    """The human pastes a long note into the notebook: the next requests are too long for the model.
    Each refused one is sent again shorter; the condensation made from a notebook cut to fit is not
    applied (it would lose the note); the night goes on."""
    note = "- (the human) " + "a long paste " * 5000 + "\n"

    def human_pastes_a_long_note(request):
        with open(repo / "runs/t/notes.md", "a") as f:
            f.write(note)
        fake.max_request_chars = len(json.dumps(request)) + 8000  # the notebook with the note does not fit
        return edit("reorder data", (ORDER_LINE, "DATA_ORDER = 3"), hypothesis="h", theme="data")
    fake.replies += [human_pastes_a_long_note, {"text": "# Research notebook\n\n- condensed\n"},
                     edit("lower bpb", (BASE_LINE, "TRUE_BPB = 0.990000"), hypothesis="h", theme="optimizer")]
    assert cli.main(["--tag", "t", *DRIVER_ARGS, "--max-experiments", "2", "--greedy"]) == 0
    assert [(x["description"], x["status"]) for x in rows(repo)] == [
        ("baseline", "keep"), ("reorder data", "discard"), ("lower bpb", "keep")]
    assert note in (repo / "runs/t/notes.md").read_text()
    sizes = [len(json.dumps(r)) for r in fake.requests]
    refused = [i for i, r in enumerate(fake.requests) if len(json.dumps(r)) > fake.max_request_chars]
    assert refused and all(sizes[i + 1] < sizes[i] for i in refused)  # each refused one: sent again shorter
    assert "characters cut: the request was too long" in json.dumps(fake.requests[-1])
    out = capsys.readouterr().out
    assert "the prompt is too long for the model (prompt is too long:" in out
    assert "the condensation was made from a notebook cut to fit the model's context; not applied" in out


@pytest.mark.parametrize("provider", ["anthropic", "openai"])
def test_a_restart_never_repeats_a_request_refused_for_its_size(tmp_path, fake, server, monkeypatch, provider):
    if provider == "anthropic":
        fake_server = fake
        fake.replies += [edit("a", ("x", "y")), edit("b", ("x", "z"))]
    else:
        fake_server = server()
        fake_server.replies += [tool_edit("a", ("x", "y")), tool_edit("b", ("x", "z"))]

    def make():  # the provider, as a (re)started driver makes it
        if provider == "anthropic":
            return anthropic_provider(fake, monkeypatch)
        return cli.make_provider("openai", "local-model", fake_server.url)
    fake_server.max_request_chars = 25000
    user = [TRAIN_PY, ("Last lines of the log:\n" + "a long log line\n" * 2500, False)]  # 40,000 characters
    first = make()
    first.limit_file = tmp_path / "llm-limits.json"
    reply = llm.ask(first, SYSTEM, user, [])
    assert reply.call["description"] == "a" and reply.shortened
    sizes = [len(json.dumps(r)) for r in fake_server.requests]
    assert len(sizes) == 2 and sizes[0] > 25000 > sizes[1]  # refused, then sent shorter
    assert json.dumps(TRAIN_PY[0])[1:-1] in json.dumps(fake_server.requests[1])  # train.py is never cut
    assert json.loads(first.limit_file.read_text())["refused_chars"] > 25000

    restarted = make()
    restarted.limit_file = tmp_path / "llm-limits.json"
    assert llm.ask(restarted, SYSTEM, user, []).call["description"] == "b"
    assert len(fake_server.requests) == 3 and len(json.dumps(fake_server.requests[2])) < 25000  # none refused


def test_shortening_leaves_the_assistant_turns_as_they_were(fake, monkeypatch):
    """A fix request whose log is too long: the tool result is cut; the thinking blocks and the
    tool call go back verbatim (the fake, like the API, refuses them altered)."""
    provider = anthropic_provider(fake, monkeypatch)
    fake.replies += [edit("a", ("x", "y")), edit("b", ("x", "z"))]
    first = llm.ask(provider, SYSTEM, [TRAIN_PY], [])
    tail = provider.feedback([first.turn], "The run failed.\n\nLast lines of its log:\n" + "log line\n" * 5000)
    fake.max_request_chars = len(json.dumps(fake.requests[0])) + 30000  # the 45,000-character log does not fit
    assert llm.ask(provider, SYSTEM, [TRAIN_PY], tail).call["description"] == "b"
    assert len(fake.requests) == 3  # the one refused, then the one sent shorter
    sent = fake.requests[-1]["messages"]
    assert sent[1] == first.turn and sent[0]["content"][0]["text"] == TRAIN_PY[0]
    result = sent[2]["content"][0]["content"]
    assert "characters cut: the request was too long for the model" in result and result.endswith("log line\n")
    assert len(result) < 45000 // 2 + 200


def test_a_prompt_too_long_with_nothing_left_to_cut_stops_with_one_line():
    with pytest.raises(SystemExit, match="too long for claude-test even with all but .* cut .*pass --model with a longer"):
        llm.shorten("claude-test", [("rules " * 2000, False)], [TRAIN_PY, ("the notebook", False)], [], 5000)
    user, tail = llm.shorten("m", SYSTEM, [TRAIN_PY, ("n" * 9000, False)], [{"role": "user", "content": "u" * 9000}],
                             12000)
    assert user[0] == TRAIN_PY and llm.request_chars(SYSTEM, user, tail) < 12000
