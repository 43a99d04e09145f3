"""The research notebook, runs/<tag>/notes.md: one line per finished experiment (its result, its
hypothesis and, once the model wrote it in a later request, its lesson), grouped under
"## <theme>" headings. The model reads it before every proposal and the human may edit it at any
time: the driver re-reads it before each change and touches only the lines it writes. Past
NOTES_MAX_CHARS the model is asked to condense it (the longer version is kept aside).
"""

import re
from pathlib import Path

from autoresearch import edits, records

NOTES_MAX_CHARS = 8000             # past this the model is asked to condense the notebook
HEADER = "# Research notebook\n\nOne line per finished experiment, grouped by theme. Edit it freely.\n"


def read(path):
    path = Path(path)
    return path.read_text() if path.exists() else ""


def add_entry(path, theme, n, line):
    """`- line` (experiment n's) at the end of the theme's section (made if missing), whatever the
    human changed; once only (a record repeated after a kill adds nothing)."""
    text = read(path) or HEADER
    lines = text.rstrip("\n").split("\n")
    if any(existing.startswith(f"- #{n} ") for existing in lines):
        return
    heading = f"## {theme}"
    if heading not in lines:
        lines += ["", heading]
        end = len(lines)
    else:
        start = lines.index(heading) + 1
        end = next((i for i in range(start, len(lines)) if lines[i].startswith("## ")), len(lines))
        while end > start and not lines[end - 1].strip():
            end -= 1
    lines.insert(end, f"- {line}")
    records.write_atomic(path, "\n".join(lines) + "\n")


def add_lesson(path, n, lesson):
    """The model's one-line lesson, added to experiment n's line; False if the line is gone (the
    human removed it, or a condensing merged it)."""
    text = read(path)
    new = re.sub(rf"^(- #{n} .*?)$", lambda m: f"{m[1]} Lesson: {lesson}", text, count=1, flags=re.M)
    if new != text:
        records.write_atomic(path, new)
    return new != text


def replace(path, condensed, snapshot, run_dir):
    """The model's condensed notebook in place of the long one (kept aside); lines added to the file
    since `snapshot` (the text the model condensed: new entries, the human's edits) are kept too."""
    condensed = edits.without_thinking(condensed).strip()
    condensed = re.sub(r"^```\w*\n(.*)\n```$", r"\1", condensed, flags=re.S).strip()  # a fenced reply
    current = read(path)
    before = set(snapshot.splitlines())
    added = [line for line in current.splitlines() if line.strip() and line not in before]
    if Path(path).exists():
        records.set_aside(Path(path), "before-condensing", run_dir)
    records.write_atomic(path, condensed + "\n" + ("\n" + "\n".join(added) + "\n" if added else ""))


def too_long(path, condensed_chars=0):
    """Past the bound, and grown by a quarter of it since it was last condensed (a model that cannot
    condense it enough is not asked again and again)."""
    chars = len(read(path))
    return chars > NOTES_MAX_CHARS and chars > condensed_chars + NOTES_MAX_CHARS // 4


def entry(p, status, mean, delta):
    """An experiment's notebook line."""
    result = f"{mean:.6f}" if mean is not None else "no val_bpb"
    change = f", {delta:+.6f}" if delta is not None else ""
    hypothesis = f" Hypothesis: {p.hypothesis.rstrip('.')}." if p.hypothesis else ""
    return f"#{p.n} {status} ({result}{change}): {p.description.rstrip('.')}.{hypothesis}"
