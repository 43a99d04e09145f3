"""The OpenAI Chat Completions API, through the official `openai` SDK (pip install -e '.[openai]'):
OpenAI, and the servers that speak it (vLLM, Ollama, llama.cpp's server, OpenRouter), selected
with --provider openai (or a model id "openai:<id>") and --base-url / OPENAI_BASE_URL.

The edit protocol is the same as with Anthropic: a call of the edit tool. A model or server
without tool calling answers in a plain-text format instead (edits.TEXT_FORMAT), which is parsed
and validated the same way; a server that refuses the tools parameter is asked without it.
"""

import json
import os

from autoresearch.edits import EDIT_TOOL, TEXT_FORMAT, TOOL_NAME, parse_text_reply
from autoresearch.llm import NotFound, PromptTooLong, Reply, Transient, check_request, refuse, sort_status, valid


class OpenAIProvider:
    name = "openai"

    def __init__(self, model, base_url, price, timeout_s):
        try:
            import openai
        except ImportError:
            raise SystemExit("autoresearch: --provider openai needs the openai SDK: pip install -e '.[openai]'")
        base_url = base_url or os.environ.get("OPENAI_BASE_URL")
        key = os.environ.get("OPENAI_API_KEY") or ("none" if base_url else None)  # a local server needs none
        if key is None:
            raise SystemExit("autoresearch: set OPENAI_API_KEY (or --base-url for a local server such as Ollama)")
        self.model, self.price, self.tools = model, price, True
        self.client = openai.OpenAI(api_key=key, base_url=base_url, max_retries=0, timeout=timeout_s)
        self.refused_chars, self.limit_file = None, None  # the caller may set limit_file (see llm.size_limit)

    def check_access(self):
        """The models list (free) must hold the model; a server without the list, or whose list names
        it otherwise (Ollama's tags), is asked one tiny message: a bad key or model stops the run now."""
        def model_ids(client):
            page = client.models.list()
            return None if isinstance(page, str) else [m.id for m in page]
        try:
            listed = check_request(self, model_ids, lambda ids: isinstance(ids, list))
        except NotFound:
            listed = []
        if self.model not in listed:
            try:
                check_request(self, lambda client: client.chat.completions.create(
                    model=self.model, messages=[{"role": "user", "content": "Reply with one word."}]), is_completion)
            except NotFound as e:
                refuse(404, str(e), self.model, "OPENAI_API_KEY")

    def request(self, system, user, tail, tool=True):
        messages = [{"role": "system", "content": "\n\n".join([text for text, _ in system] + [TEXT_FORMAT] * tool)},
                    {"role": "user", "content": "\n\n".join(text for text, _ in user)}] + tail
        tools = [{"type": "function", "function": {"name": TOOL_NAME, "description": EDIT_TOOL["description"],
                                                   "parameters": EDIT_TOOL["input_schema"]}}]
        with_tools = self.tools and tool  # (another thread may turn tools off meanwhile: this request's own)
        try:
            reply = self.guard(lambda: self.client.chat.completions.create(
                model=self.model, messages=messages, **({"tools": tools} if with_tools else {})), is_completion,
                with_tools)
        except NotFound as e:
            refuse(404, str(e), self.model, "OPENAI_API_KEY")
        choice = reply.choices[0]
        message = choice.message
        turn = {"role": "assistant", "content": message.content or ""}
        call, problem = None, ""
        if message.tool_calls:
            turn["tool_calls"] = [c.model_dump(mode="json", exclude_none=True) for c in message.tool_calls]
            call, problem = read_call(message.tool_calls[0])
        else:
            call, problem = parse_text_reply(message.content or "")
            if call is None:  # what to answer with: the tool, unless this server refused it
                problem += (f"; call the {TOOL_NAME} tool (or answer in the text format)" if with_tools else
                            "; answer in the text format of the system prompt (this server takes no tools)")
        usage = reply.usage
        cached = getattr(getattr(usage, "prompt_tokens_details", None), "cached_tokens", 0) or 0 if usage else 0
        counts = {"input": (usage.prompt_tokens or 0) - cached, "output": usage.completion_tokens or 0,
                  "cache_read": cached} if usage else {}
        return Reply(reply.model_dump(mode="json"), turn, call, problem, counts, message.content or "",
                     cut=choice.finish_reason == "length")

    @staticmethod
    def feedback(messages, text):
        """Tell the model about its last reply: a tool message for each of its calls (the first gets
        `text`; the API wants every call answered), or a plain user turn."""
        calls = messages[-1].get("tool_calls") if messages and messages[-1]["role"] == "assistant" else None
        ids = [c.get("id") for c in calls or [] if isinstance(c, dict) and c.get("id")]
        if not ids:
            return messages + [{"role": "user", "content": text}]
        return messages + [{"role": "tool", "tool_call_id": i, "content": text if k == 0 else
                            "ignored: one call per reply"} for k, i in enumerate(ids)]

    def guard(self, call, is_valid, sent_tools=False):
        """call() with the SDK's errors sorted into transient (Transient) and refusals (SystemExit);
        a server that refuses the tools parameter is asked in the text format from then on."""
        import openai
        try:
            reply = call()
        except openai.APIStatusError as e:
            body = e.body if isinstance(e.body, dict) else {}
            code, message = e.status_code, str(body.get("message") or getattr(e, "message", "") or e)
            if body.get("code") == "insufficient_quota":  # OpenAI's 429 for an empty account: no use waiting
                refuse(code, message, self.model, "OPENAI_API_KEY")
            if body.get("code") == "context_length_exceeded":
                raise PromptTooLong(message)
            lowered = message.lower()
            if code == 400 and sent_tools and "tool" in lowered and any(
                    w in lowered for w in ("support", "requires", "enable", "jinja")):  # Ollama, vLLM, llama.cpp
                print(f"  LLM API: the server does not take tools ({message[:80]}); edits in the text format "
                      "from now on", flush=True)
                self.tools = False
                raise Transient("asking again without tools", 0.01)
            sort_status(e, message, self.model, "OPENAI_API_KEY")
        except openai.APIConnectionError as e:
            raise Transient(f"connection problem ({e.__class__.__name__})", None)
        except (openai.APIResponseValidationError, json.JSONDecodeError, AttributeError, TypeError) as e:
            raise Transient(f"a malformed reply ({e.__class__.__name__})", None)
        return valid(reply, is_valid)


def read_call(tool_call):
    """(the edit tool's arguments, "") or (None, what is wrong with the call, for the model)."""
    function = getattr(tool_call, "function", None)
    if function is None:
        return None, f"your tool call names no function; call {TOOL_NAME}"
    arguments = getattr(function, "arguments", None)
    if isinstance(arguments, dict):  # some servers send an object, not a string
        return arguments, ""
    try:
        call = json.loads(arguments or "{}")
    except (json.JSONDecodeError, TypeError) as e:
        return None, f"the arguments of your {TOOL_NAME} call are not valid JSON ({e}); call it again"
    if not isinstance(call, dict):
        return None, f"the arguments of your {TOOL_NAME} call must be a JSON object"
    return call, ""


def is_completion(reply):
    from openai.types.chat import ChatCompletion
    return isinstance(reply, ChatCompletion) and bool(reply.choices) and reply.choices[0].message is not None
