"""A fake OpenAI-compatible Chat Completions server on 127.0.0.1 (the kind vLLM, Ollama and
llama.cpp's server offer) for driver tests; the real `openai` client talks to it.

Replies are scripted in order: an edit as a tool call, an edit in the text format, a tool call
whose arguments are not JSON, an HTTP error, or a function of the request. With tools=False
the server behaves like one without tool calling: a request that carries `tools` gets a 400
(reject_tools=True) or the tools are ignored. Like the real API it refuses a `tool` message
that does not answer the previous assistant turn's tool call, and with `max_request_chars` set a
longer request body (OpenAI's 400 context_length_exceeded). GET /v1/models lists `models`.
"""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def tool_edit(description, *pairs, hypothesis="", theme="", lessons=()):
    """A tool call: tool_edit("idea", ("old", "new"), ...)."""
    return {"tool": {"description": description, "hypothesis": hypothesis, "theme": theme,
                     "lessons": [{"experiment": n, "lesson": text} for n, text in lessons],
                     "edits": [{"search": a, "replace": b} for a, b in pairs]}}


def text_edit(description, *pairs, hypothesis="", theme="", lessons=()):
    """The same edit in the plain-text format, for a model without tool calling."""
    lines = ["Here is my experiment.", f"DESCRIPTION: {description}", f"HYPOTHESIS: {hypothesis}",
             f"THEME: {theme}"] + [f"LESSON #{n}: {text}" for n, text in lessons]
    for a, b in pairs:
        lines += ["<<<<<<< SEARCH", a, "=======", b, ">>>>>>> REPLACE"]
    return {"text": "\n".join(lines) + "\n"}


def bad_arguments():
    return {"raw_arguments": "{\"description\": \"cut off"}


def two_calls(first, second):
    """Two tool calls in one reply (parallel tool use)."""
    return {"calls": [first["tool"], second["tool"]]}


def cut_at_length(reply):
    return {**reply, "finish_reason": "length"}


def error(status, message="scripted failure", headers=None):
    """An HTTP error answer, with extra response headers (e.g. retry-after-ms)."""
    return {"status": status, "message": message, "headers": headers or {}}


class FakeOpenAI:
    def __init__(self, tools=True, reject_tools=False, models=("local-model",)):
        self.replies, self.requests, self.tools, self.reject_tools, self.models = [], [], tools, reject_tools, models
        self.model_lists, self.lock, self.max_request_chars = 0, threading.Lock(), None
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                fake.model_lists += 1
                if fake.models is None:
                    return self.send(404, {"error": {"message": "no such route"}})
                self.send(200, {"object": "list", "data": [{"id": m, "object": "model", "created": 0,
                                                            "owned_by": "fake"} for m in fake.models]})

            def do_POST(self):
                raw = self.rfile.read(int(self.headers["content-length"]))
                body = json.loads(raw)
                fake.requests.append(body)
                if fake.max_request_chars and len(raw) > fake.max_request_chars:
                    return self.send(400, {"error": {
                        "message": f"This model's maximum context length is {fake.max_request_chars} tokens. However, "
                                   f"your messages resulted in {len(raw)} tokens.",
                        "type": "invalid_request_error", "code": "context_length_exceeded"}})
                problem = fake.check(body)
                if problem:  # refused before any reply is used
                    return self.send(400, {"error": {"message": problem, "type": "invalid_request_error"}})
                with fake.lock:
                    reply = fake.replies.pop(0) if fake.replies else error(400, "fake server: no scripted reply left")
                if callable(reply):
                    reply = reply(body)
                if "status" in reply:
                    return self.send(reply["status"], {"error": {"message": reply["message"], "type": "error",
                                                                 **({"code": reply["code"]} if "code" in reply else {})}},
                                     reply.get("headers", {}))
                n = len(fake.requests)
                message = {"role": "assistant", "content": reply.get("text")}
                if "tool" in reply or "raw_arguments" in reply or "calls" in reply:
                    calls = reply.get("calls") or [reply.get("tool")]
                    arguments = [reply["raw_arguments"]] if "raw_arguments" in reply else [json.dumps(c) for c in calls]
                    message["tool_calls"] = [{"id": f"call_{n}_{k}", "type": "function",
                                              "function": {"name": "edit_train_py", "arguments": a}}
                                             for k, a in enumerate(arguments)]
                self.send(200, {"id": f"chatcmpl-{n}", "object": "chat.completion", "created": 0,
                                "model": body["model"], "choices": [{"index": 0, "message": message,
                                                                     "finish_reason": reply.get("finish_reason", "stop")}],
                                "usage": {"prompt_tokens": 1000, "completion_tokens": 200, "total_tokens": 1200,
                                          "prompt_tokens_details": {"cached_tokens": 300}}})

            def send(self, status, payload, headers=None):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def check(self, body):
        """What a real server would refuse ('' if nothing)."""
        if "tools" in body and self.reject_tools:
            return "this model does not support tools"
        messages = body["messages"]
        for i, m in enumerate(messages):
            if m["role"] == "assistant" and m.get("tool_calls"):  # every call answered, right after it
                answers = []
                for follower in messages[i + 1:]:
                    if follower["role"] != "tool":
                        break
                    answers.append(follower.get("tool_call_id"))
                if sorted(answers) != sorted(c["id"] for c in m["tool_calls"]):
                    return "tool_call_ids did not have response messages"
            if m["role"] == "tool" and messages[i - 1]["role"] not in ("assistant", "tool"):
                return "a tool message must follow the assistant turn with its tool call"
        return ""

    def close(self):
        self.server.shutdown()
        self.server.server_close()
