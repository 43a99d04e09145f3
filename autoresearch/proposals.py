"""Proposals: asking the LLM for an idea (or a fix) as validated edits, in a thread of its own so
that the GPU never waits for the LLM; and re-applying an idea's edits to a best that moved.

The asking works on a snapshot (an Ask) and returns an Answer; only the loop, in the main
thread, turns answers into experiments and adds their cost to the run's spend.
"""

from dataclasses import dataclass, field
from pathlib import Path

from autoresearch import edits, llm, records

EDIT_ATTEMPTS = 3                  # times an invalid edit goes back to the LLM


@dataclass
class Ask:
    """One request: for a new idea (messages empty), a fix (the conversation so far) or the notebook
    condensed (kind "condense")."""
    n: int
    kind: str                      # idea | fix | condense
    exp_dir: Path
    source: str                    # the train.py the edits apply to
    system: list                   # the request's parts, (text, cacheable)
    user: list
    messages: list                 # the conversation after the first user turn
    conversation_file: Path
    tried: frozenset               # sha256 of every train.py tried


@dataclass
class Answer:
    description: str | None        # None: no valid edit after EDIT_ATTEMPTS
    source: str | None
    edits: list | None
    hypothesis: str = ""
    theme: str = ""
    lessons: list = field(default_factory=list)
    text: str = ""                 # a condensed notebook


def propose(ctx, ask, on_reply):
    """Ask until an edit validates (EDIT_ATTEMPTS); every request, reply and the conversation are
    kept in the experiment's directory, and each reply's tokens go to on_reply at once (the loop
    adds them to the spend and saves it). Runs in a thread of its own: writes only there."""
    answer = Answer(None, None, None)
    for _ in range(EDIT_ATTEMPTS):
        records.save_json(ask.exp_dir / "prompt.json", {"system": ask.system, "user": ask.user, "messages": ask.messages})
        reply = llm.ask(ctx.llm, ask.system, ask.user, ask.messages)
        replies_path = ask.exp_dir / "reply.json"
        replies = records.load_json(replies_path) if replies_path.exists() else []
        records.save_json(replies_path, replies + [reply.raw])
        on_reply(reply.counts)
        ask.messages.append(reply.turn)
        if reply.cut or reply.call is None:  # a reply cut at the length limit is never applied
            problem = ("your reply was cut off at the length limit: answer with less text" if reply.cut else
                       reply.problem or f"Reply by calling the {edits.TOOL_NAME} tool (or in the text format).")
            ask.messages = ctx.llm.feedback(ask.messages, problem)
            continue
        args = reply.call
        new, error = edits.apply_edits(ask.source, args.get("edits"), ask.tried)
        if new is not None:
            answer = Answer(records.clean_description(args.get("description", "")), new, args["edits"],
                            one_line(args.get("hypothesis")), one_line(args.get("theme"))[:40].lower() or "other",
                            [x for x in args.get("lessons") or [] if isinstance(x, dict)])
            break
        print(f"  edit rejected: {error}", flush=True)
        ask.messages = ctx.llm.feedback(ask.messages, error)
    records.save_json(ask.conversation_file, ask.messages)
    return answer


def condense(ctx, ask, on_reply):
    """The notebook rewritten shorter by the model (one request, no tool); no text (the notebook kept
    as it is) when the reply was cut at the length limit, or the model was sent the notebook cut."""
    reply = llm.ask(ctx.llm, ask.system, ask.user, [], tool=False)
    records.save_json(ask.exp_dir / "condense-reply.json", reply.raw)
    on_reply(reply.counts)
    if reply.cut or reply.shortened:
        why = "was cut at the length limit" if reply.cut else "was made from a notebook cut to fit the model's context"
        print(f"  notebook: the condensation {why}; not applied (notes.md stays as it is)", flush=True)
        return Answer(None, None, None)
    return Answer(None, None, None, text=reply.text)


def one_line(text):
    return " ".join(str(text or "").split())[:200]


def add_spend(ctx, night, exp_dir, counts):
    """Add one reply's tokens and cost to the run's total and to the experiment's usage.json."""
    path = Path(exp_dir) / "usage.json"
    per_exp = records.load_json(path) if path.exists() else {"usd": 0.0}
    usd = llm.cost(counts, ctx.llm.price)
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
