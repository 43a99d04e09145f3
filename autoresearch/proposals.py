"""Proposals: asking the LLM for an idea (or a fix) as validated edits, in a thread of its own so
that the GPU never waits for the LLM; and re-applying an idea's edits to a best that moved.

The asking works on a snapshot (an Ask) and returns an Answer; only the loop, in the main
thread, turns answers into experiments and adds their cost to the run's spend.
"""

import json
from dataclasses import dataclass
from pathlib import Path

from autoresearch import edits, llm, prompt, records

EDIT_ATTEMPTS = 3                  # times an invalid edit goes back to the LLM


@dataclass
class Ask:
    """One request: for a new idea (messages empty) or for a fix (the conversation so far)."""
    n: int
    kind: str                      # idea | fix
    exp_dir: Path
    source: str                    # the train.py the edits apply to
    shown: str                     # the train.py the model is shown (the best)
    history: str                   # results.tsv so far and what is in flight
    messages: list
    conversation_file: Path
    tried: frozenset               # sha256 of every train.py tried


@dataclass
class Answer:
    description: str | None        # None: no valid edit after EDIT_ATTEMPTS
    source: str | None
    edits: list | None


def propose(ctx, settings, ask, on_reply):
    """Ask until an edit validates (EDIT_ATTEMPTS); every request, reply and the conversation are
    kept in the experiment's directory, and each reply's usage goes to on_reply at once (the loop
    adds it to the spend and saves it). Runs in a thread of its own: reads files, writes only there."""
    program = ctx.repo / "program.md"
    answer = Answer(None, None, None)
    for _ in range(EDIT_ATTEMPTS):
        program_md = program.read_text() if program.exists() else "(no program.md)"  # read afresh
        request = prompt.build_request(ctx.model, ctx.repo, settings, program_md, ask.shown, ask.history,
                                       ask.messages)
        records.save_json(ask.exp_dir / "prompt.json", request)
        reply = llm.ask(ctx.client, request)
        replies_path = ask.exp_dir / "reply.json"
        replies = json.loads(replies_path.read_text()) if replies_path.exists() else []
        records.save_json(replies_path, replies + [reply.model_dump(mode="json")])
        on_reply(reply.usage)
        # The assistant turn goes back verbatim: models that think (on by default since Claude 5)
        # reject a follow-up whose thinking blocks were dropped or altered.
        ask.messages.append({"role": "assistant",
                             "content": [b.model_dump(mode="json", exclude_none=True) for b in reply.content]})
        tool = next((b for b in reply.content if b.type == "tool_use"), None)
        if tool is None:
            ask.messages.append({"role": "user", "content": f"Reply by calling the {edits.TOOL_NAME} tool."})
            continue
        args = tool.input if isinstance(tool.input, dict) else {}
        new, error = edits.apply_edits(ask.source, args.get("edits"), ask.tried)
        if new is not None:
            answer.description, answer.source, answer.edits = \
                records.clean_description(args.get("description", "")), new, args["edits"]
            break
        print(f"  edit rejected: {error}", flush=True)
        ask.messages.append({"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": tool.id, "is_error": True, "content": error}]})
    records.save_json(ask.conversation_file, ask.messages)
    return answer


def add_spend(ctx, night, exp_dir, usages):
    """Add replies' tokens and cost to the run's total and to the experiment's usage.json."""
    path = Path(exp_dir) / "usage.json"
    per_exp = json.loads(path.read_text()) if path.exists() else {"usd": 0.0}
    for usage in usages:
        counts, usd = llm.usage_cost(ctx.model, usage)
        for spend in (night.spend, per_exp):
            for k, v in counts.items():
                spend[k] = spend.get(k, 0) + v
            spend["usd"] += usd or 0.0
        per_exp["price_known"] = usd is not None
    records.save_json(path, per_exp)


def in_flight_text(night):
    """What the model is told about experiments proposed and not yet decided (so that it proposes
    something different): each one's description and diff against the code it edits."""
    pending = [p for p in night.in_flight if p.kind == "candidate"]
    if not pending:
        return ""
    parts = ["\n\nIn flight (proposed or training, not decided yet; propose something different):"]
    for p in pending:
        diff = (Path(p.dir) / "diff.patch").read_text() if (Path(p.dir) / "diff.patch").exists() else ""
        parts.append(f"\n#{p.n}: {p.description}\n```diff\n{diff.strip()}\n```")
    return "\n".join(parts)


def reapply(source, edit_lists):
    """`source` with every edit list applied in order, or None if one no longer applies (or there
    are none: an idea from a driver that did not keep them)."""
    if not edit_lists:
        return None
    for edit_list in edit_lists:
        source, _ = edits.apply_edits(source, edit_list, frozenset())
        if source is None:
            return None
    return source
