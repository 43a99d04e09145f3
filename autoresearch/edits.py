"""The edit protocol: the tool the model answers with, and the validation of its edits.

An edit is a list of exact search/replace pairs applied in order to train.py. An edit that
does not apply, does not compile, changes nothing, repeats a file already tried or only
changes the seed goes back to the model with a precise message, before any GPU time.
"""

import difflib
import re

from autoresearch.records import sha256_bytes

TOOL_NAME = "edit_train_py"
EDIT_TOOL = {
    "name": TOOL_NAME,
    "description": "Apply one experiment to train.py as exact search/replace edits.",
    "input_schema": {
        "type": "object",
        "properties": {
            "description": {"type": "string",
                            "description": "One short line: what this experiment changes."},
            "hypothesis": {"type": "string", "description": "One line: why it should lower val_bpb."},
            "theme": {"type": "string",
                      "description": "One or two words naming the kind of change (e.g. optimizer, schedule, "
                                     "architecture, attention, data, throughput): the notebook groups by it."},
            "lessons": {"type": "array", "description": "One line for each finished experiment you are asked "
                                                        "about: what its result says.",
                        "items": {"type": "object",
                                  "properties": {"experiment": {"type": "integer"}, "lesson": {"type": "string"}},
                                  "required": ["experiment", "lesson"]}},
            "edits": {"type": "array", "description": "Applied in order to train.py.",
                      "items": {"type": "object",
                                "properties": {"search": {"type": "string"},
                                               "replace": {"type": "string"}},
                                "required": ["search", "replace"]}},
        },
        "required": ["description", "edits"],
    },
}
TEXT_FORMAT = f"""If you cannot call the {TOOL_NAME} tool, answer in exactly this text format instead:
DESCRIPTION: <one line: what this experiment changes>
HYPOTHESIS: <one line: why it should lower val_bpb>
THEME: <one or two words: the kind of change>
LESSON #<n>: <one line for each finished experiment you are asked about>
<<<<<<< SEARCH
<lines of train.py, exactly as they are>
=======
<the lines that replace them>
>>>>>>> REPLACE
(one SEARCH/REPLACE block per edit, applied in order)"""
BLOCK_RE = re.compile(r"^<<<<<<< SEARCH[ \t]*\n(.*?)^=======[ \t]*\n(.*?)^>>>>>>> REPLACE[ \t]*$", re.M | re.S)


def without_thinking(text):
    """A reply's text without the <think>...</think> blocks of a reasoning model."""
    return re.sub(r"<think>.*?</think>", "", text, flags=re.S)


def parse_text_reply(text):
    """(the edit tool's arguments, "") from a reply in TEXT_FORMAT, or (None, what is wrong, for the
    model) when it holds no edit block or an unclosed one. Tolerates CRLF, a thinking preamble, bold
    field names and spaces after a marker."""
    text = without_thinking(text.replace("\r\n", "\n"))
    blocks = BLOCK_RE.findall(text)
    opened = len(re.findall(r"^<<<<<<< SEARCH", text, re.M))
    if not opened:
        return None, "your reply holds no <<<<<<< SEARCH block"
    if len(blocks) != opened:
        return None, ("your SEARCH/REPLACE block was not closed: each <<<<<<< SEARCH needs a ======= line, "
                      "then the new lines, then a >>>>>>> REPLACE line")

    def field(name):
        m = re.search(rf"^\W*{name}\W*:\**[ \t]*(.*)$", text, re.M | re.I)
        return m[1].strip() if m else ""

    def lines(block):  # the block's lines, without the newline before the next marker
        return block[:-1] if block.endswith("\n") else block
    return {"description": field("DESCRIPTION"), "hypothesis": field("HYPOTHESIS"), "theme": field("THEME"),
            "lessons": [{"experiment": int(n), "lesson": lesson.strip()}
                        for n, lesson in re.findall(r"^\W*LESSON #(\d+)\W*:\**[ \t]*(.*)$", text, re.M | re.I)],
            "edits": [{"search": lines(search), "replace": lines(replace)} for search, replace in blocks]}, ""


def apply_edits(source, edits, tried_hashes):
    """(new source, "") or (None, a precise message for the model)."""
    if not isinstance(edits, list) or not edits:
        return None, "`edits` must be a non-empty list of {search, replace} objects."
    new = source
    for i, edit in enumerate(edits, 1):
        if not isinstance(edit, dict) or not isinstance(edit.get("search"), str) \
                or not isinstance(edit.get("replace"), str):
            return None, f"edit {i}: needs string fields `search` and `replace`."
        search = edit["search"]
        count = new.count(search) if search else 0
        if count != 1:
            where = "is empty" if not search else "was not found" if count == 0 else \
                f"matches {count} places (add surrounding lines so it matches exactly one)"
            hint = ""
            if count == 0 and search.strip():
                close = difflib.get_close_matches(search.strip().split("\n")[0],
                                                  [line.strip() for line in new.split("\n")], n=1)
                hint = f" The closest line in train.py is: {close[0]!r}." if close else ""
            return None, (f"edit {i}: the search text {where} in train.py as it is after the "
                          f"previous edits; it must match exactly once, whitespace included.{hint}")
        new = new.replace(search, edit["replace"], 1)
    if new == source:
        return None, "the edits leave train.py unchanged; propose an actual change."
    try:
        compile(new, "train.py", "exec")
    except SyntaxError as e:
        return None, (f"the edited train.py does not compile: line {e.lineno}: {e.msg}: "
                      f"{(e.text or '').strip()!r}")
    if sha256_bytes(new.encode()) in tried_hashes:
        return None, ("this train.py is identical to one already tried in this run; "
                      "propose something else.")
    changed = [line for line in difflib.ndiff(source.splitlines(), new.splitlines())
               if line[:2] in ("- ", "+ ") and line[2:].strip()]
    if changed and all("seed" in line.lower() for line in changed):
        return None, "the edit only changes the seed; a different seed is noise, not an experiment."
    return new, ""


def unified_diff(old, new):
    return "".join(difflib.unified_diff(old.splitlines(True), new.splitlines(True), "a/train.py", "b/train.py"))
