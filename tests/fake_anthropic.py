"""A fake Anthropic Messages API on 127.0.0.1 for driver tests.

The real `anthropic` client talks to it through ANTHROPIC_BASE_URL. Replies are scripted
in order: an edit (answered as a thinking block then a tool_use, as current models reply), a
text ({"text": ...}, a reply without the tool),
an HTTP error, a broken 200 (cut short, or a proxy's HTML page), or a function of the
request. Every request body is recorded. Like the real API for models that think, it answers
400 to a forced tool_choice and to a conversation whose assistant turns lost their thinking
blocks; with `max_request_chars` set, a longer request body gets the API's 400 "prompt is too
long" (without using a scripted reply). GET /v1/models/<id> (the driver's start-up check)
answers from `model_replies`, a model entry when that is empty; `model_checks` records the ids
asked for.
"""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def edit(description, *pairs, hypothesis=None, theme=None, lessons=()):
    """A scripted tool_use reply: edit("idea", ("old", "new"), ..., hypothesis=..., theme=...,
    lessons=[(n, "lesson")])."""
    reply = {"description": description, "edits": [{"search": a, "replace": b} for a, b in pairs]}
    if hypothesis is not None:
        reply.update(hypothesis=hypothesis, theme=theme or "other",
                     lessons=[{"experiment": n, "lesson": text} for n, text in lessons])
    return reply


def error(status, kind="api_error", message="scripted failure", headers=None):
    """An HTTP error answer, with extra response headers (e.g. retry-after-ms)."""
    return {"status": status, "kind": kind, "message": message, "headers": headers or {}}


def cut_at_max_tokens(reply):
    """The reply as the API sends one stopped at the length limit (stop_reason "max_tokens")."""
    return {**reply, "stop_reason": "max_tokens"}


def drop():
    """Close the connection without answering (a dropped connection)."""
    return {"drop": True}


def cut_short():
    """A 200 whose JSON body ends early, with no content-length (the connection closes)."""
    return {"raw": b'{"id": "msg_x", "type": "message", "role": "assis', "type": b"application/json"}


def html_page():
    """A 200 that is a proxy's HTML page, not the API's JSON."""
    return {"raw": b"<html><body>Please log in to the proxy</body></html>", "type": b"text/html"}


def not_a_message():
    """A 200 JSON body of another shape (a gateway's error passed on as a success)."""
    return {"raw": b'{"type": "error", "error": {"type": "overloaded_error", "message": "busy"}}',
            "type": b"application/json"}


def slow(seconds, reply):
    """Answer `reply` only after `seconds` (longer than the client's timeout: a timeout)."""
    return {"sleep": seconds, "then": reply}


class FakeAnthropic:
    """Scripted /v1/messages server; `replies` is consumed in order, `requests` records bodies."""

    def __init__(self):
        self.replies, self.requests, self.max_request_chars = [], [], None
        self.model_replies, self.model_checks = [], []
        self.lock = threading.Lock()  # requests arrive on several threads (the pipeline asks ahead)
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                model = self.path.rsplit("/", 1)[-1]
                fake.model_checks.append(model)
                reply = fake.model_replies.pop(0) if fake.model_replies else \
                    {"type": "model", "id": model, "display_name": model, "created_at": "2026-01-01T00:00:00Z"}
                if "status" in reply:
                    return self.send(reply["status"], {"type": "error", "error": {
                        "type": reply["kind"], "message": reply["message"]}})
                if "raw" in reply:
                    return self.send_raw(reply)
                self.send(200, reply)

            def do_POST(self):
                raw = self.rfile.read(int(self.headers["content-length"]))
                body = json.loads(raw)
                if fake.max_request_chars and len(raw) > fake.max_request_chars:
                    with fake.lock:
                        fake.requests.append(body)
                    return self.send(400, {"type": "error", "error": {
                        "type": "invalid_request_error",
                        "message": f"prompt is too long: {len(raw)} tokens > {fake.max_request_chars} maximum"}})
                with fake.lock:
                    fake.requests.append(body)
                    reply = fake.replies.pop(0) if fake.replies else \
                        error(400, "invalid_request_error", "fake server: no scripted reply left")
                problem = fake.check(body)
                if problem:
                    return self.send(400, {"type": "error", "error": {
                        "type": "invalid_request_error", "message": problem}})
                if callable(reply):
                    reply = reply(body)
                if "drop" in reply:
                    self.close_connection = True
                    return
                if "sleep" in reply:
                    time.sleep(reply["sleep"])
                    reply = reply["then"]
                if "status" in reply:
                    payload = {"type": "error", "error": {"type": reply["kind"], "message": reply["message"]}}
                    return self.send(reply["status"], payload, reply.get("headers", {}))
                if "raw" in reply:
                    return self.send_raw(reply)
                n = len(fake.requests)
                reply = dict(reply)
                stop_reason = reply.pop("stop_reason", None)
                if set(reply) == {"text"}:
                    answer = [{"type": "text", "text": reply["text"]}]
                else:  # {"calls": [...]}: several tool calls in one reply (parallel tool use)
                    answer = [{"type": "tool_use", "id": f"toolu_{n}_{k}", "name": "edit_train_py", "input": call}
                              for k, call in enumerate(reply.get("calls") or [reply])]
                self.send(200, {
                    "id": f"msg_{n}", "type": "message", "role": "assistant", "model": body["model"],
                    "content": [{"type": "thinking", "thinking": f"thought {n}", "signature": f"sig_{n}"}, *answer],
                    "stop_reason": stop_reason or ("tool_use" if answer[0]["type"] == "tool_use" else "end_turn"),
                    "stop_sequence": None,
                    "usage": {"input_tokens": 1000, "output_tokens": 200,
                              "cache_creation_input_tokens": 2000, "cache_read_input_tokens": 3000}})

            def send_raw(self, reply):
                """200, the body as given, no content-length: the client reads until the close."""
                self.close_connection = True
                self.send_response(200)
                self.send_header("content-type", reply["type"].decode())
                self.send_header("connection", "close")
                self.end_headers()
                self.wfile.write(reply["raw"])

            def send(self, status, payload, headers=None):
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(data)))
                    for name, value in (headers or {}).items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client gave up (timeout test)
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @staticmethod
    def check(body):
        """What the real API would refuse in this request for a thinking model, or ''."""
        if body.get("tool_choice", {}).get("type") in ("any", "tool"):
            return "forced tool use is not compatible with thinking"
        messages = body["messages"]
        for i, message in enumerate(messages):
            if message["role"] == "assistant":
                thinking = [b for b in message["content"] if b["type"] == "thinking"]
                if not thinking or not thinking[0].get("signature", "").startswith("sig_"):
                    return "assistant turns must keep their thinking blocks unchanged"
                calls = sorted(b["id"] for b in message["content"] if b["type"] == "tool_use")
                after = messages[i + 1]["content"] if i + 1 < len(messages) else []
                answered = sorted(b["tool_use_id"] for b in after if isinstance(b, dict) and b["type"] == "tool_result") \
                    if isinstance(after, list) else []
                if calls and i + 1 < len(messages) and answered != calls:
                    return "tool_use ids were found without tool_result blocks immediately after"
        return ""

    def close(self):
        self.server.shutdown()
        self.server.server_close()
