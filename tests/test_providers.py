"""Any model, and a research memory (issue 11): the OpenAI Chat Completions API through the real
`openai` client against a fake server (tool calls, the text format for a server without tools,
retries, a malformed tool call, the start-up check, prices), and the notebook (hypotheses,
lessons, themes, condensing), the plateau nudge and `report --json`, for both providers.
Run: python -m pytest tests/test_providers.py"""

import json

import pytest

from driver_helpers import (BASE_LINE, DRIVER_ARGS, MODE_LINE, fake, git, journal, repo, rows, run_openai,  # noqa: F401
                            server)
from fake_anthropic import edit
from fake_openai import bad_arguments, cut_at_length, error, text_edit, tool_edit, two_calls
from autoresearch import cli, llm, notebook

ORDER_LINE = "DATA_ORDER = 0"


def ideas(kind):
    """Three ideas with hypotheses, themes and lessons for the finished ones, as tool calls or text."""
    make = tool_edit if kind == "tools" else text_edit
    return [make("lower bpb", (BASE_LINE, "TRUE_BPB = 0.990000"), hypothesis="a smaller true loss", theme="optimizer"),
            make("reorder data", (ORDER_LINE, "DATA_ORDER = 3"), hypothesis="order matters", theme="data",
                 lessons=[(1, "the loss went down by 0.01: keep pushing it")]),
            make("much lower", ("TRUE_BPB = 0.990000", "TRUE_BPB = 0.980000"), hypothesis="more of the same",
                 theme="optimizer", lessons=[(2, "the data order changes nothing")])]


@pytest.mark.parametrize("kind", ["tools", "text", "no tools at all"])
def test_a_night_with_an_openai_compatible_server(repo, server, kind, capsys):
    """With tool calls; with a server that ignores tools (the model answers in the text format); with
    one that refuses the tools parameter (the driver asks without it). Hypotheses, lessons, themes
    and the notebook, and a plateau nudge, all visible in the saved prompts."""
    fake_server = server(tools=kind == "tools", reject_tools=kind == "no tools at all")
    fake_server.replies += ideas("tools" if kind == "tools" else "text")
    assert run_openai(fake_server, "--max-experiments", "3", "--greedy", "--price", "0.5,1.5", "--plateau", "1") == 0
    assert [(x["description"], x["status"]) for x in rows(repo)] == [
        ("baseline", "keep"), ("lower bpb", "keep"), ("reorder data", "discard"), ("much lower", "keep")]
    notes = (repo / "runs/t/notes.md").read_text()
    assert "## optimizer" in notes and "## data" in notes
    assert "#1 keep (0.990000, -0.010000): lower bpb. Hypothesis: a smaller true loss. Lesson: the loss went down" in notes
    assert "#2 discard (0.990000, +0.000000): reorder data. Hypothesis: order matters. Lesson: the data order" in notes
    third = json.dumps(json.loads((repo / "runs/t/0003/prompt.json").read_text()))
    assert "Give a one-line lesson" in third and "#2 discard" in third and "Lesson: the loss went down" in third
    assert "Plateau: no change has been kept in the last 1 experiments" in third and "data (1 tried, 0 kept)" in third
    sent = fake_server.requests[-1]
    assert ("tools" in sent) == (kind != "no tools at all") and sent["messages"][0]["role"] == "system"
    assert "<<<<<<< SEARCH" in sent["messages"][0]["content"]  # the text format, for a model without tools
    usage = json.loads((repo / "runs/t/0001/usage.json").read_text())
    assert usage["input"] == 700 and usage["cache_read"] == 300 and usage["output"] == 200
    assert usage["usd"] == pytest.approx((1000 * 0.5 + 200 * 1.5) / 1e6)  # --price: cache reads at the input price
    assert "(openai)" in capsys.readouterr().out


def test_retries_and_a_malformed_tool_call_with_an_openai_compatible_server(repo, server, capsys):
    fake_server = server()
    good = tool_edit("lower bpb", (BASE_LINE, "TRUE_BPB = 0.990000"))
    fake_server.replies += [error(429, "slow down"), error(503, "loading model"), bad_arguments(), good]
    assert run_openai(fake_server, "--max-experiments", "1", "--greedy") == 0
    assert [x["status"] for x in rows(repo)] == ["keep", "keep"]
    out = capsys.readouterr().out
    assert "HTTP 429 (slow down)" in out and "HTTP 503 (loading model)" in out
    fed_back = fake_server.requests[-1]["messages"][-1]  # the bad call answered with what was wrong
    assert fed_back["role"] == "tool" and "not valid JSON" in fed_back["content"]
    assert "no price known for model local-model: tokens are counted" in out
    assert json.loads((repo / "runs/t/0001/usage.json").read_text())["price_known"] is False


@pytest.mark.parametrize("case", ["bad key", "unknown model", "no models list"])
def test_the_start_up_check_with_an_openai_compatible_server(repo, server, case):
    fake_server = server(models=None if case == "no models list" else ["another-model"])
    if case == "bad key":
        fake_server.replies += [error(401, "invalid api key")]
    elif case == "unknown model":
        fake_server.replies += [error(404, "model 'local-model' not found")]
    else:
        fake_server.replies += [tool_edit("pong")]  # a tiny message instead of the list
    if case == "no models list":
        assert run_openai(fake_server, "--max-experiments", "0", "--greedy") == 0
        assert [x["description"] for x in rows(repo)] == ["baseline"]
        return
    with pytest.raises(SystemExit) as stop:
        run_openai(fake_server, "--max-experiments", "0", "--greedy")
    assert ("check OPENAI_API_KEY" if case == "bad key" else "unknown model 'local-model'") in str(stop.value)
    assert not (repo / "runs/t").exists()


def test_a_night_with_anthropic_keeps_the_notebook_and_nudges_off_a_plateau(repo, fake):
    fake.replies += [edit("reorder data", (ORDER_LINE, "DATA_ORDER = 3"), hypothesis="order matters", theme="Data"),
                     edit("again", (ORDER_LINE, "DATA_ORDER = 4"), hypothesis="maybe this order", theme="data",
                          lessons=[(1, "order is noise here")]),
                     edit("lower bpb", (BASE_LINE, "TRUE_BPB = 0.990000"), hypothesis="smaller loss", theme="optimizer",
                          lessons=[(2, "still noise")])]
    assert cli.main(["--tag", "t", *DRIVER_ARGS, "--max-experiments", "3", "--greedy", "--plateau", "2"]) == 0
    notes = (repo / "runs/t/notes.md").read_text()
    assert "Lesson: order is noise here" in notes and "Lesson: still noise" in notes and "## data" in notes
    third = json.dumps(fake.requests[2])
    assert "Plateau: no change has been kept in the last 2 experiments" in third and "data (2 tried, 0 kept)" in third
    assert journal(repo)["since_keep"] == 0 and journal(repo)["themes"]["data"] == {"discard": 2}


def test_the_human_edits_the_notebook_and_the_driver_keeps_the_edit(repo, fake):
    def human_writes_a_note(request):
        with open(repo / "runs/t/notes.md", "a") as f:
            f.write("\n## the human\n- try a longer warm-down before anything else\n")
        return edit("lower bpb", (BASE_LINE, "TRUE_BPB = 0.990000"), hypothesis="h", theme="optimizer")
    fake.replies += [edit("reorder data", (ORDER_LINE, "DATA_ORDER = 3"), hypothesis="h", theme="data"),
                     human_writes_a_note,
                     edit("again", (ORDER_LINE, "DATA_ORDER = 4"), hypothesis="h", theme="data")]
    assert cli.main(["--tag", "t", *DRIVER_ARGS, "--max-experiments", "3", "--greedy"]) == 0
    notes = (repo / "runs/t/notes.md").read_text()
    assert "- try a longer warm-down before anything else" in notes and "#3 discard" in notes
    assert "longer warm-down" in json.dumps(fake.requests[2])  # the model read the human's note


def test_a_notebook_past_its_bound_is_condensed_by_the_model(repo, fake, monkeypatch):
    monkeypatch.setattr(notebook, "NOTES_MAX_CHARS", 400)
    condensed = "# Research notebook\n\n## data\n- orders 3 and 4: noise.\n"

    def condense(request):  # the request without a tool: it answers in text
        assert "tools" not in request and "Rewrite it in under 300 characters" in json.dumps(request)
        return {"text": condensed}
    fake.replies += [edit(f"order {k}", (ORDER_LINE, f"DATA_ORDER = {k}"), hypothesis="x" * 150, theme="data")
                     for k in (3, 4)] + [condense, edit("order 5", (ORDER_LINE, "DATA_ORDER = 5"), theme="data",
                                                        hypothesis="h")]
    assert cli.main(["--tag", "t", *DRIVER_ARGS, "--max-experiments", "3", "--greedy"]) == 0
    notes = (repo / "runs/t/notes.md").read_text()
    assert notes.startswith(condensed) and "#3 discard" in notes
    assert list((repo / "runs/t").glob("notes-before-condensing-*.md"))  # the long one, kept aside


def test_report_json_and_themes(repo, fake, capsys):
    fake.replies += [edit("lower bpb", (BASE_LINE, "TRUE_BPB = 0.990000"), hypothesis="h", theme="optimizer"),
                     edit("reorder", (ORDER_LINE, "DATA_ORDER = 3"), hypothesis="h", theme="data")]
    assert cli.main(["--tag", "t", *DRIVER_ARGS, "--max-experiments", "2", "--greedy"]) == 0
    capsys.readouterr()
    assert cli.main(["report", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["experiments"] == 2 and s["kept"] == 1 and s["best"]["description"] == "lower bpb"
    assert s["themes"] == {"optimizer": {"keep": 1}, "data": {"discard": 1}} and s["since_keep"] == 1
    assert s["spend"]["usd"] > 0 and "gpu" in s["duty_cycle"]
    assert cli.main(["report", "--png", ""]) == 0
    text = capsys.readouterr().out
    assert "themes (from the notebook" in text and "  optimizer: 1 tried, 1 kept" in text
    assert "since the last kept change: 1 experiments" in text


def test_price_flag_and_provider_selection():
    assert llm.parse_price("0,0") == (0.0, 0.0, 0.0, 0.0)
    with pytest.raises(SystemExit, match="--price 'free'"):
        llm.parse_price("free")
    assert llm.cost({"input": 1_000_000, "output": 1_000_000}, llm.parse_price("0.5,1.5")) == pytest.approx(2.0)
    assert llm.cost({"input": 10}, None) is None
    assert llm.parse_price("3,15,3.75,0.3") == (3.0, 15.0, 3.75, 0.3)
    assert cli.make_provider("anthropic", "openai:gpt-test", "http://127.0.0.1:9/v1").name == "openai"


# ---------------------------------------------------------------------------
# What an independent review found (each test fails without its fix)
# ---------------------------------------------------------------------------

def test_every_parallel_tool_call_is_answered(repo, server, fake):
    """A reply with two calls (the first one's edit does not apply): both are answered, as both
    APIs require, and the model's second try is taken."""
    openai_server = server()
    bad, good = tool_edit("typo", ("TRUE_BPB = 7\n", "x")), tool_edit("lower", (BASE_LINE, "TRUE_BPB = 0.990000"))
    openai_server.replies += [two_calls(bad, good), good]
    assert run_openai(openai_server, "--max-experiments", "1", "--greedy") == 0
    assert [x["description"] for x in rows(repo)] == ["baseline", "lower"]
    answers = [m for m in openai_server.requests[-1]["messages"] if m["role"] == "tool"]
    assert len(answers) == 2 and "was not found" in answers[0]["content"] and "one call per reply" in answers[1]["content"]


def test_every_parallel_tool_use_is_answered_with_anthropic(repo, fake):
    fake.replies += [{"calls": [edit("typo", ("TRUE_BPB = 7\n", "x")), edit("lower", (BASE_LINE, "TRUE_BPB = 0.99"))]},
                     edit("lower", (BASE_LINE, "TRUE_BPB = 0.990000"))]
    assert cli.main(["--tag", "t", *DRIVER_ARGS, "--max-experiments", "1", "--greedy"]) == 0
    results = fake.requests[-1]["messages"][-1]["content"]
    assert [r["type"] for r in results] == ["tool_result", "tool_result"]


def test_a_refusal_of_tools_seen_by_two_threads_at_once_ends_nothing(server):
    """Two requests carry tools when the server refuses them: both are asked again without, neither
    ends the night (the flag is the request's own, not the provider's, which a thread may flip)."""
    import threading
    openai_server = server(reject_tools=True)
    openai_server.replies += [text_edit("a", ("x", "y")), text_edit("b", ("x", "y"))]
    provider = cli.make_provider("openai", "local-model", openai_server.url)
    barrier, results = threading.Barrier(2), []

    def ask():
        barrier.wait()
        results.append(llm.ask(provider, [("rules", False)], [("train.py", False)], []).call["description"])
    threads = [threading.Thread(target=ask) for _ in range(2)]
    llm.LLM_BACKOFF_S, backoff = 0.01, llm.LLM_BACKOFF_S
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
    finally:
        llm.LLM_BACKOFF_S = backoff
    assert sorted(results) == ["a", "b"]


def test_a_reply_cut_at_the_length_limit_is_not_applied(repo, server):
    openai_server = server()
    openai_server.replies += [cut_at_length(tool_edit("half", (BASE_LINE, "TRUE_BPB = 0.5"))),
                              tool_edit("whole", (BASE_LINE, "TRUE_BPB = 0.990000"))]
    assert run_openai(openai_server, "--max-experiments", "1", "--greedy") == 0
    assert [x["description"] for x in rows(repo)] == ["baseline", "whole"]
    assert "cut off at the length limit" in json.dumps(openai_server.requests[-1]["messages"][-1])


def test_an_exhausted_quota_stops_at_once(repo, server):
    openai_server = server(models=[])
    openai_server.replies += [{"status": 429, "message": "You exceeded your current quota"}]
    openai_server.replies[0]["code"] = "insufficient_quota"
    with pytest.raises(SystemExit, match="refused the request \\(429\\)"):
        run_openai(openai_server, "--max-experiments", "0", "--greedy")


@pytest.mark.parametrize("reply", [
    "Sure!\r\n**DESCRIPTION:** lower bpb\r\n<<<<<<< SEARCH \r\nTRUE_BPB = 1.000000\r\n=======\r\nTRUE_BPB = 0.99\r\n>>>>>>> REPLACE \r\n",
    "<think>\n<<<<<<< SEARCH\nnot in the file\n=======\nx\n>>>>>>> REPLACE\n</think>\nDescription: lower bpb\n"
    "```\n<<<<<<< SEARCH\nTRUE_BPB = 1.000000\n=======\nTRUE_BPB = 0.99\n>>>>>>> REPLACE\n```\n"])
def test_the_text_format_from_realistic_replies(reply):
    from autoresearch.edits import apply_edits, parse_text_reply
    call, problem = parse_text_reply(reply)
    assert call["description"] == "lower bpb" and len(call["edits"]) == 1 and problem == ""
    new, error = apply_edits("TRUE_BPB = 1.000000\nMODE = 'ok'\n", call["edits"], frozenset())
    assert error == "" and new == "TRUE_BPB = 0.99\nMODE = 'ok'\n"
    call, problem = parse_text_reply(reply.split(">>>>>>> REPLACE")[0])  # cut before its end: not applied
    assert call is None and "was not closed" in problem


def test_condensing_keeps_what_was_added_while_the_model_wrote(repo, fake, monkeypatch):
    monkeypatch.setattr(notebook, "NOTES_MAX_CHARS", 400)

    def condense_while_the_human_writes(request):
        with open(repo / "runs/t/notes.md", "a") as f:
            f.write("- (the human) try a longer warm-down\n")
        return {"text": "```markdown\n# Research notebook\n\n## data\n- orders 3, 4: noise.\n```"}
    fake.replies += [edit(f"order {k}", (ORDER_LINE, f"DATA_ORDER = {k}"), hypothesis="x" * 150, theme="data")
                     for k in (3, 4)] + [condense_while_the_human_writes,
                                         edit("order 5", (ORDER_LINE, "DATA_ORDER = 5"), theme="data", hypothesis="h")]
    assert cli.main(["--tag", "t", *DRIVER_ARGS, "--max-experiments", "3", "--greedy"]) == 0
    notes = (repo / "runs/t/notes.md").read_text()
    assert notes.startswith("# Research notebook\n\n## data\n- orders 3, 4: noise.") and "```" not in notes
    assert "- (the human) try a longer warm-down" in notes and "#3 discard" in notes


def test_a_kill_after_the_notebook_line_adds_it_once(repo, fake, monkeypatch):
    fake.replies += [edit("reorder", (ORDER_LINE, "DATA_ORDER = 3"), hypothesis="h", theme="data")]
    original = notebook.add_entry

    class Killed(BaseException):
        pass

    def dies_after(*args):
        original(*args)
        raise Killed
    with monkeypatch.context() as patch:
        patch.setattr(notebook, "add_entry", dies_after)
        with pytest.raises(Killed):
            cli.main(["--tag", "t", *DRIVER_ARGS, "--max-experiments", "1", "--greedy"])
    assert cli.main(["--tag", "t", *DRIVER_ARGS, "--max-experiments", "1", "--greedy"]) == 0
    assert (repo / "runs/t/notes.md").read_text().count("- #1 ") == 1


def test_lessons_numbered_as_text_still_reach_the_notebook(repo, fake):
    fake.replies += [edit("reorder", (ORDER_LINE, "DATA_ORDER = 3"), hypothesis="h", theme="data"),
                     {**edit("lower", (BASE_LINE, "TRUE_BPB = 0.990000"), hypothesis="h", theme="optimizer"),
                      "lessons": [{"experiment": "#1", "lesson": "order is noise"}]}]
    assert cli.main(["--tag", "t", *DRIVER_ARGS, "--max-experiments", "2", "--greedy"]) == 0
    assert "Lesson: order is noise" in (repo / "runs/t/notes.md").read_text()


def test_odd_tool_calls_become_messages_for_the_model_not_crashes():
    from types import SimpleNamespace as Call
    from autoresearch.openai_api import read_call
    assert read_call(Call(function=Call(arguments={"description": "d", "edits": []}))) == (
        {"description": "d", "edits": []}, "")  # an object, not a string: taken as it is
    assert read_call(Call(function=None)) == (None, "your tool call names no function; call edit_train_py")
    assert "not valid JSON" in read_call(Call(function=Call(arguments="{cut")))[1]
    assert "must be a JSON object" in read_call(Call(function=Call(arguments="[1]")))[1]
