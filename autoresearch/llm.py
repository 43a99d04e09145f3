"""The LLM API: one request with retries, the start-up access check, usage and cost.

Transient failures (rate limits, overload, 5xx, timeouts, dropped connections, a reply that is
not the API's JSON, such as a proxy's HTML page or a body cut short) are retried with backoff
forever: they never end a night. A refusal (bad key, no permission, unknown model, a request
the API rejects) stops the run with one line.
"""

import json
import time

LLM_MAX_TOKENS = 16000             # longest reply, thinking included
LLM_TIMEOUT_S = 600.0              # one request
LLM_BACKOFF_S = 2.0                # first wait after a transient API error, doubled each time
LLM_BACKOFF_MAX_S = 300.0          # longest wait between retries (retries never give up)

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
REFUSAL_HINTS = {401: "check ANTHROPIC_API_KEY", 403: "the key is not allowed to use this API or model"}


def make_client():
    import anthropic
    return anthropic.Anthropic(max_retries=0, timeout=LLM_TIMEOUT_S)


def is_message(reply):
    """A Messages API reply (a proxy's 200 can be HTML, or JSON of another shape)."""
    import anthropic
    return isinstance(reply, anthropic.types.Message) and reply.type == "message" and isinstance(reply.content, list)


def ask(client, request):
    """messages.create, retried until the API answers with a message."""
    return with_retries(lambda: client.messages.create(**request), is_message, request["model"])


def check_access(client, model):
    """One free request (the model's entry in the models list) before any GPU time is spent: a
    missing key or an unknown model stops the run now, not after the baseline runs. A gateway
    without the models list (404) is asked one tiny message instead."""
    import anthropic

    def ping():
        return with_retries(lambda: client.messages.create(model=model, max_tokens=1, messages=[
            {"role": "user", "content": "Reply with one word."}]), is_message, model)
    with_retries(lambda: client.models.retrieve(model),
                 lambda reply: isinstance(reply, anthropic.types.ModelInfo) and bool(reply.id), model, on_404=ping)


def with_retries(call, is_valid, model, on_404=None):
    """call() until its reply is_valid; transient errors wait and retry, refusals stop the run
    (a 404 calls on_404 instead, when given)."""
    import anthropic
    delay_s = LLM_BACKOFF_S
    while True:
        try:
            reply = call()
            if is_valid(reply):
                return reply
            wait_s, what = delay_s, f"a reply that is not the API's ({str(reply)[:60]!r})"
        except anthropic.APIStatusError as e:
            code = e.status_code
            if code == 404 and on_404:
                return on_404()
            if not (code in (408, 409, 429) or code >= 500):
                hint = REFUSAL_HINTS.get(code) or \
                    (f"unknown model {model!r}: pass --model with a current model id" if code == 404
                     else "fix the request and restart")
                raise SystemExit(f"autoresearch: the LLM API refused the request ({code}): "
                                 f"{api_error_text(e)} - {hint}")
            retry_after = e.response.headers.get("retry-after", "") if e.response is not None else ""
            wait_s = max(delay_s, min(float(retry_after), LLM_BACKOFF_MAX_S)) \
                if retry_after.replace(".", "", 1).isdigit() else delay_s
            what = f"HTTP {code} ({api_error_text(e)})"
        except anthropic.APIConnectionError as e:
            wait_s, what = delay_s, f"connection problem ({e.__class__.__name__})"
        except (anthropic.APIResponseValidationError, json.JSONDecodeError) as e:
            wait_s, what = delay_s, f"a malformed reply ({e.__class__.__name__})"
        print(f"  LLM API: {what}; retrying in {wait_s:.1f} s", flush=True)
        time.sleep(wait_s)
        delay_s = min(delay_s * 2, LLM_BACKOFF_MAX_S)


def api_error_text(error):
    body = getattr(error, "body", None)
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return body["error"].get("message", "") or str(error)
    return str(error)


def model_price(model):
    keys = [k for k in PRICES_PER_MTOK if model.startswith(k)]
    return PRICES_PER_MTOK[max(keys, key=len)] if keys else None


def usage_cost(model, usage):
    """(token counts dict, USD or None when the model's price is unknown)."""
    counts = {"input": getattr(usage, "input_tokens", 0) or 0,
              "output": getattr(usage, "output_tokens", 0) or 0,
              "cache_write": getattr(usage, "cache_creation_input_tokens", 0) or 0,
              "cache_read": getattr(usage, "cache_read_input_tokens", 0) or 0}
    price = model_price(model)
    if price is None:
        return counts, None
    usd = sum(n * p for n, p in zip(counts.values(), price))  # both in the table's order
    return counts, usd / 1e6
