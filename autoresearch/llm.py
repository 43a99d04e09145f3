"""The LLM API, whichever provider: one request with retries, the start-up access check, the
edit tool's arguments out of a reply, usage and cost. Anthropic's Messages API is the default;
openai_api.py speaks the OpenAI Chat Completions API (OpenAI, vLLM, Ollama, llama.cpp, OpenRouter).

Transient failures (rate limits, overload, 5xx, timeouts, dropped connections, a reply that is
not the API's JSON, such as a proxy's HTML page or a body cut short) are retried with backoff
forever: they never end a night (only the start-up check gives up, after STARTUP_CHECK_S). A
request the model refuses as too long is sent again shortened, and later ones are shortened
before they are sent. A refusal (bad key, no permission, unknown model, a request the API
rejects) stops the run with one line.
"""

import email.utils
import json
import math
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

from autoresearch.records import save_json

LLM_MAX_TOKENS = 16000             # longest reply, thinking included
LLM_TIMEOUT_S = 600.0              # one request
LLM_BACKOFF_S = 2.0                # first wait after a transient API error, doubled each time
LLM_BACKOFF_MAX_S = 300.0          # longest wait between retries (retries never give up)
STARTUP_CHECK_S = 120.0            # the start-up check gives up on an API it cannot reach after this
MIN_CUT_CHARS = 2000               # a text shorter than this is never cut to make a request fit

# USD per million tokens: input, output, 5-minute cache write, cache read; the longest
# prefix of the model id wins. Source: https://platform.claude.com/docs/en/about-claude/pricing
# (Sonnet 5.5 cache reads as cut on 2026-10-07; Haiku 5.5 at its prompt <= 100k tokens band).
PRICES_PER_MTOK = {
    "claude-opus-5-5": (4.0, 20.0, 5.0, 0.20),
    "claude-opus-5": (5.0, 25.0, 6.25, 0.50),
    "claude-opus-4-5": (5.0, 25.0, 6.25, 0.50),
    "claude-opus-4-6": (5.0, 25.0, 6.25, 0.50),
    "claude-opus-4-7": (5.0, 25.0, 6.25, 0.50),
    "claude-opus-4-8": (5.0, 25.0, 6.25, 0.50),
    "claude-opus-4-1": (15.0, 75.0, 18.75, 1.50),
    "claude-sonnet-5-5": (2.0, 10.0, 2.50, 0.10),
    "claude-sonnet-5": (2.0, 10.0, 2.50, 0.20),
    "claude-sonnet-4": (3.0, 15.0, 3.75, 0.30),
    "claude-haiku-5-5": (0.10, 0.50, 0.125, 0.01),
    "claude-haiku-4-5": (1.0, 5.0, 1.25, 0.10),
}
REFUSAL_HINTS = {401: "check {key}", 403: "the key is not allowed to use this API or model"}
# A 400 saying the request does not fit the model's context: Anthropic, OpenAI, vLLM, llama.cpp, Ollama.
TOO_LONG_RE = re.compile(r"prompt is too long|context[ _](length|window|size)|too many tokens", re.IGNORECASE)
LIMIT_LOCK = threading.Lock()      # (requests refused as too long may come from several threads at once)


@dataclass
class Reply:
    """One reply, whichever the API."""
    raw: dict                      # as the API sent it (kept in reply.json)
    turn: dict                     # the assistant turn, to send back verbatim in a follow-up
    call: dict | None              # the edit tool's arguments (from a tool call, or from the text)
    problem: str = ""              # why the reply's call could not be read (told to the model)
    counts: dict = field(default_factory=dict)  # tokens: input, output, cache_write, cache_read
    text: str = ""                 # the reply's text
    cut: bool = False              # stopped at the length limit: never applied
    shortened: bool = False        # the request was sent with texts cut, to fit the model's context


class Transient(Exception):
    """A failure worth waiting out: (what happened, seconds the server asked to wait or None)."""


class PromptTooLong(Exception):
    """The API refused the request as longer than the model's context: (the API's message)."""


def refuse(code, message, model, key="ANTHROPIC_API_KEY"):
    hint = REFUSAL_HINTS.get(code, "").format(key=key) or (
        f"unknown model {model!r}: pass --model with a current model id" if code == 404 else "fix the request and restart")
    raise SystemExit(f"autoresearch: the LLM API refused the request ({code}): {message} - {hint}")


def with_retries(call, limit_s=None):
    """call() until it returns; a Transient waits (backoff, or the server's retry-after) and tries
    again, forever, or past limit_s seconds goes up; anything else (a refusal's SystemExit) goes up."""
    delay_s, give_up = LLM_BACKOFF_S, time.monotonic() + (limit_s if limit_s is not None else math.inf)
    while True:
        try:
            return call()
        except Transient as e:
            what, retry_after = e.args
            wait_s = max(delay_s, min(retry_after, LLM_BACKOFF_MAX_S)) if retry_after else delay_s
            if time.monotonic() >= give_up:
                raise
        wait_s = min(wait_s, max(give_up - time.monotonic(), 0.0))
        print(f"  LLM API: {what}; retrying in {wait_s:.1f} s", flush=True)
        time.sleep(wait_s)
        delay_s = min(delay_s * 2, LLM_BACKOFF_MAX_S)


def check_request(provider, request, is_valid):
    """A request of the start-up check, request(client), retried for STARTUP_CHECK_S at most (each
    try as long at most): an API that cannot be reached stops the run with its address."""
    client = provider.client.with_options(timeout=STARTUP_CHECK_S)
    try:
        return with_retries(lambda: provider.guard(lambda: request(client), is_valid), STARTUP_CHECK_S)
    except Transient as e:
        raise SystemExit(f"autoresearch: could not reach the LLM API at {provider.client.base_url} for "
                         f"{STARTUP_CHECK_S:.0f} s ({e.args[0]}); check --base-url (or {provider.name.upper()}"
                         "_BASE_URL) and your network, then restart")


def ask(provider, system, user, tail, tool=True):
    """One request (retried until answered): system and user are lists of (text, cacheable); with
    tool, the model is offered the edit tool. A request as long as one the model refused (now, or
    before a restart) is shortened before it is sent; a refused one is sent again shortened."""
    while True:
        limit = size_limit(provider)
        sent_user, sent_tail = shorten(provider.model, system, user, tail, limit) if limit else (user, tail)
        try:
            reply = with_retries(partial(provider.request, system, sent_user, sent_tail, tool))
        except PromptTooLong as e:
            remember_refused(provider, request_chars(system, sent_user, sent_tail))
            print(f"  LLM API: the prompt is too long for the model ({str(e)[:120]}); sending it shortened", flush=True)
            continue
        reply.shortened = request_chars(system, sent_user, sent_tail) < request_chars(system, user, tail)
        return reply


# ---------------------------------------------------------------------------
# Requests that do not fit the model's context
# ---------------------------------------------------------------------------

def request_chars(system, user, tail):
    """A request's size in characters (the measure the refused size is kept in)."""
    return len(json.dumps([system, user, tail]))


def size_limit(provider):
    """The smallest request size the model refused as too long, this run or before a restart (from
    provider.limit_file, for the same model); None if none was."""
    known, path = provider.refused_chars, provider.limit_file
    if path is not None and Path(path).exists():
        try:
            saved = json.loads(Path(path).read_text())
        except (OSError, ValueError):
            saved = {}
        if isinstance(saved, dict) and saved.get("model") == provider.model and isinstance(saved.get("refused_chars"), int):
            known = min(known or saved["refused_chars"], saved["refused_chars"])
    return known


def remember_refused(provider, chars):
    """Keep a refused request's size, in provider.limit_file too when set (a restart reads it)."""
    with LIMIT_LOCK:
        provider.refused_chars = min(size_limit(provider) or chars, chars)
        if provider.limit_file is not None:
            save_json(provider.limit_file, {"model": provider.model, "refused_chars": provider.refused_chars})


def shorten(model, system, user, tail, limit_chars):
    """(user, tail), copies, with the longest text the model can do without halved until the request
    is under limit_chars: a part of the first turn that is not cached (train.py is), a user turn or a
    tool result. The system parts, train.py and the assistant turns (Anthropic refuses altered
    thinking blocks) are sent as they are. Nothing left to cut stops the run."""
    user, tail = [list(part) for part in user], json.loads(json.dumps(tail))
    while request_chars(system, user, tail) >= limit_chars:
        texts = [(part, 0) for part in user if not part[1]] + list(user_texts(tail))
        texts = [(holder, key) for holder, key in texts if len(holder[key]) >= MIN_CUT_CHARS]
        if not texts:
            raise SystemExit(f"autoresearch: the prompt is too long for {model} even with all but the rules, "
                             f"prepare.py, program.md and train.py cut ({request_chars(system, user, tail)} "
                             "characters); pass --model with a longer context (or shorten program.md) and restart")
        holder, key = max(texts, key=lambda t: len(t[0][t[1]]))
        holder[key] = cut_middle(holder[key])
    return [tuple(part) for part in user], tail


def user_texts(tail):
    """(holder, key) of each text in the conversation's user turns and tool results."""
    for message in tail:
        if message.get("role") not in ("user", "tool"):
            continue
        content = message.get("content")
        if isinstance(content, str):
            yield message, "content"
        for block in content if isinstance(content, list) else []:
            for key in ("text", "content"):
                if isinstance(block, dict) and isinstance(block.get(key), str):
                    yield block, key


def cut_middle(text):
    """Half of `text`: its first and last quarters (a log's error is at its end), a note between."""
    keep = len(text) // 4
    return (text[:keep] + f"\n[... {len(text) - 2 * keep} characters cut: the request was too long for the "
            "model ...]\n" + text[-keep:])


def parse_price(text):
    """--price IN,OUT[,CACHE_WRITE,CACHE_READ] (USD per million tokens) as the four prices; without
    the cache prices, cache writes and reads cost as input (an upper bound)."""
    try:
        prices = [float(x) for x in text.split(",")]
        if len(prices) not in (2, 4) or min(prices) < 0:
            raise ValueError
    except ValueError:
        raise SystemExit(f"autoresearch: --price {text!r}: give USD per million input and output tokens (and "
                         "optionally cache writes and reads), e.g. 0.5,1.5")
    return tuple(prices) if len(prices) == 4 else (prices[0], prices[1], prices[0], prices[0])


def model_price(model):
    keys = [k for k in PRICES_PER_MTOK if model.startswith(k)]
    return PRICES_PER_MTOK[max(keys, key=len)] if keys else None


def cost(counts, price):
    """USD of a reply's tokens, or None when the price is unknown."""
    if price is None:
        return None
    return sum(counts.get(k, 0) * p for k, p in zip(("input", "output", "cache_write", "cache_read"), price)) / 1e6


# ---------------------------------------------------------------------------
# Anthropic's Messages API
# ---------------------------------------------------------------------------

class AnthropicProvider:
    name = "anthropic"

    def __init__(self, model, price, timeout_s):
        import anthropic
        self.model, self.price = model, price
        self.client = anthropic.Anthropic(max_retries=0, timeout=timeout_s)
        self.refused_chars, self.limit_file = None, None  # the caller may set limit_file (see size_limit)

    def check_access(self):
        """One free request (the model's entry in the models list) before any GPU time is spent: a
        missing key or an unknown model stops the run now. A gateway without the models list (404)
        is asked one tiny message instead."""
        import anthropic
        try:
            check_request(self, lambda client: client.models.retrieve(self.model),
                          lambda r: isinstance(r, anthropic.types.ModelInfo) and bool(r.id))
        except NotFound:
            try:
                check_request(self, lambda client: client.messages.create(
                    model=self.model, max_tokens=1, messages=[{"role": "user", "content": "Reply with one word."}]),
                    is_message)
            except NotFound as e:
                refuse(404, str(e), self.model)

    def request(self, system, user, tail, tool=True):
        from autoresearch.edits import EDIT_TOOL
        def blocks(parts):  # (text, cacheable) -> text blocks, a cache breakpoint on each cacheable one
            return [{"type": "text", "text": text, **({"cache_control": {"type": "ephemeral"}} if cache else {})}
                    for text, cache in parts]
        first = {"role": "user", "content": blocks(user)}
        # No forced tool_choice: current models think by default and answer a forced tool with a 400;
        # the prompt asks for the tool, and a reply without it is asked again.
        request = {"model": self.model, "max_tokens": LLM_MAX_TOKENS, "system": blocks(system), "messages": [first] + tail,
                   **({"tools": [EDIT_TOOL]} if tool else {})}
        try:
            reply = self.guard(lambda: self.client.messages.create(**request), is_message)
        except NotFound as e:
            refuse(404, str(e), self.model)
        call = next((b for b in reply.content if b.type == "tool_use"), None)
        usage = reply.usage
        # The assistant turn goes back verbatim: models that think (on by default since Claude 5)
        # reject a follow-up whose thinking blocks were dropped or altered.
        return Reply(reply.model_dump(mode="json"),
                     {"role": "assistant", "content": [b.model_dump(mode="json", exclude_none=True) for b in reply.content]},
                     (call.input if isinstance(call.input, dict) else {}) if call else None,
                     "",
                     counts={"input": usage.input_tokens or 0, "output": usage.output_tokens or 0,
                             "cache_write": getattr(usage, "cache_creation_input_tokens", 0) or 0,
                             "cache_read": getattr(usage, "cache_read_input_tokens", 0) or 0},
                     text="".join(b.text for b in reply.content if b.type == "text"),
                     cut=reply.stop_reason == "max_tokens")

    @staticmethod
    def feedback(messages, text):
        """Tell the model about its last reply: an error result for each of its tool calls (the first
        gets `text`; the API wants every call answered), or a plain turn."""
        last = messages[-1] if messages and messages[-1]["role"] == "assistant" else {}
        ids = [b["id"] for b in last.get("content") or [] if isinstance(b, dict) and b.get("type") == "tool_use"]
        if not ids:
            return messages + [{"role": "user", "content": text}]
        return messages + [{"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": i, "is_error": True,
             "content": text if k == 0 else "ignored: one call per reply"} for k, i in enumerate(ids)]}]

    def guard(self, call, is_valid):
        """call() with Anthropic's errors sorted into transient (Transient) and refusals (SystemExit)."""
        import anthropic
        try:
            reply = call()
        except anthropic.APIStatusError as e:
            sort_status(e, api_error_text(e), self.model, "ANTHROPIC_API_KEY")
        except anthropic.APIConnectionError as e:
            raise Transient(f"connection problem ({e.__class__.__name__})", None)
        except (anthropic.APIResponseValidationError, json.JSONDecodeError) as e:
            raise Transient(f"a malformed reply ({e.__class__.__name__})", None)
        return valid(reply, is_valid)


def sort_status(error, message, model, key):
    """An HTTP error answer of either SDK: NotFound (404), PromptTooLong, a refusal (SystemExit) or a
    Transient."""
    code = error.status_code
    if code == 404:
        raise NotFound(message)
    if code == 413 or code == 400 and TOO_LONG_RE.search(message):
        raise PromptTooLong(message)
    if not (code in (408, 409, 429) or code >= 500):
        refuse(code, message, model, key)
    raise Transient(f"HTTP {code} ({message[:120]})",
                    retry_after_s(error.response.headers) if error.response is not None else None)


def retry_after_s(headers):
    """The wait the server asked for: retry-after-ms, else retry-after in seconds or as an HTTP date
    (RFC 9110; a date past is 0); None when it asked for none."""
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        try:
            seconds = float(headers.get(name, "")) * scale
        except ValueError:
            continue
        if math.isfinite(seconds) and seconds >= 0:
            return seconds
    try:
        date = email.utils.parsedate_to_datetime(headers.get("retry-after", ""))
    except (TypeError, ValueError, IndexError):
        return None
    date = date if date.tzinfo else date.replace(tzinfo=timezone.utc)
    return max((date - datetime.now(timezone.utc)).total_seconds(), 0.0)


def valid(reply, is_valid):
    """The reply, if it is the API's (a proxy's 200 can be an HTML page, or JSON of another shape)."""
    if not is_valid(reply):
        raise Transient(f"a reply that is not the API's ({str(reply)[:60]!r})", None)
    return reply


class NotFound(Exception):
    """A 404: an unknown model, or an endpoint the server does not have."""


def is_message(reply):
    """A Messages API reply (a proxy's 200 can be HTML, or JSON of another shape)."""
    import anthropic
    return isinstance(reply, anthropic.types.Message) and reply.type == "message" and isinstance(reply.content, list)


def api_error_text(error):
    body = getattr(error, "body", None)
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return body["error"].get("message", "") or str(error)
    return str(error)
