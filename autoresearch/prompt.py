"""What the model is shown: the system prompt, the fixed parts of prepare.py, program.md,
the current train.py, the research notebook and the run's history, the static parts marked
cacheable (prompt caching, where the provider has it).
"""

import ast
import os
import re
from pathlib import Path

from autoresearch.decisions import margin
from autoresearch.edits import TOOL_NAME
from autoresearch.records import TSV_HEADER, read_tail

PREPARE_API = ("MAX_SEQ_LEN", "TIME_BUDGET", "EVAL_TOKENS", "VOCAB_SIZE", "SEED", "Tokenizer",
               "get_token_bytes", "make_dataloader", "evaluate_bpb", "check_causal")  # shown to the model

SYSTEM_PROMPT = f"""You are an autonomous ML researcher. Each turn you propose ONE experiment:
a change to train.py that you expect to lower val_bpb (validation bits per byte) within the
fixed training time budget. Reply only by calling the {TOOL_NAME} tool with a short honest
description (one line, what you changed) and exact search/replace edits: each `search` must
occur exactly once in the current train.py (copy it character for character, whitespace
included); edits apply in order. Only train.py can change. The metric, the data and
prepare.py are fixed. The driver sets the seed through AUTORESEARCH_SEED; changing the seed
is not an experiment and never counts as a win. If a run fails you get its log tail: fix the
cause with another edit to the file as you left it. Say in one line why you expect the change
to help (hypothesis) and name its kind (theme); when asked, give a one-line lesson for each
finished experiment (what its result says), so that the notebook remembers what was learnt."""


LOG_TAIL_LINES = 60                # a failed run's last log lines sent to the model
LOG_LINE_CHARS = 500               # each cut to this (a line can be megabytes)
LOG_TAIL_CHARS = 12000             # and all of them together
LOG_READ_BYTES = 256 << 10         # what is read of a log's end to find them (a log can be any size)
# What looks like a key, a token or a password: never sent to the LLM API (a run can print a file
# it read, or its environment, before it fails).
SECRET_RE = re.compile(
    r"-----BEGIN[A-Z ]*PRIVATE KEY-----.*?(?:-----END[A-Z ]*PRIVATE KEY-----|\Z)"  # a private key, to its end
    r"|\b(?:sk-[A-Za-z0-9_-]{16,}|gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,}|xox[abprs]-[A-Za-z0-9-]{10,}"
    r"|hf_[A-Za-z0-9]{20,}|AKIA[0-9A-Z]{16}|AIza[0-9A-Za-z_-]{30,}"  # API keys of common shapes
    r"|eyJ[A-Za-z0-9_-]{10,2000}\.[A-Za-z0-9_-]{10,2000}\.[A-Za-z0-9_-]{10,})"  # a JSON web token
    r"|(?P<name>(?i:\b(?:api[_-]?key|secret|token|passw(?:or)?d)[\"']?[ \t]{0,8}[:=][ \t]{0,8}[\"']?))[^\s\"']{6,}",
    re.S)


def mask_secrets(text, env=None):
    """`text` with what looks like a key or token replaced by [masked]: the driver's own environment
    values named like secrets (8 characters or more), and the common shapes of keys and tokens."""
    env = os.environ if env is None else env
    for name, value in env.items():
        if len(value) >= 8 and re.search(r"KEY|TOKEN|SECRET|PASS|AUTH|CREDENTIAL", name, re.I) and value in text:
            text = text.replace(value, "[masked]")
    return SECRET_RE.sub(lambda m: (m["name"] or "") + "[masked]", text)


def log_tail(path, lines=LOG_TAIL_LINES):
    """A failed run's log tail for the model: its last lines, each cut to LOG_LINE_CHARS and all to
    LOG_TAIL_CHARS (saying so), keys and tokens masked; read from the log's end only."""
    text = mask_secrets(read_tail(path, LOG_READ_BYTES))  # (before any cut: no key split in two)
    kept = []
    for line in text.splitlines()[-lines:]:
        cut = len(line) - LOG_LINE_CHARS
        kept.append(line if cut <= 0 else f"{line[:LOG_LINE_CHARS]} [... {cut:,} more characters cut]")
    tail = "\n".join(kept)
    if len(tail) > LOG_TAIL_CHARS:
        tail = f"[... {len(tail) - LOG_TAIL_CHARS:,} characters cut]\n" + tail[-LOG_TAIL_CHARS:]
    return tail


def fixed_prepare_parts(source):
    """What the model needs of prepare.py: the constants in force, the API train.py uses
    (signatures and docstrings) and the metric in full."""
    tree = ast.parse(source)

    def signature(node, indent=""):
        head = ast.get_source_segment(source, node).split(":\n", 1)[0] + ":"
        doc = ast.get_docstring(node)
        doc = f'\n{indent}    """' + doc.replace("\n", f"\n{indent}    ") + '"""' if doc else ""
        return indent + head.strip() + doc

    parts = []
    for node in tree.body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id in PREPARE_API for t in targets):
                parts.append(ast.get_source_segment(source, node))
        elif isinstance(node, ast.FunctionDef) and node.name == "evaluate_bpb":
            parts.append(ast.get_source_segment(source, node))
        elif isinstance(node, ast.FunctionDef) and node.name in PREPARE_API:
            parts.append(signature(node) + "\n    ...")
        elif isinstance(node, ast.ClassDef) and node.name in PREPARE_API:
            methods = [signature(m, "    ") + "\n        ..." for m in node.body
                       if isinstance(m, ast.FunctionDef) and not m.name.startswith("_")]
            parts.append("\n\n".join([signature(node)] + methods))
    return "\n\n".join(parts)


def history_text(night, greedy):
    """All rows of this run, the best marked, plus what counts as a win."""
    out = [TSV_HEADER.strip()]
    for line in night.rows:
        line = line.rstrip("\n")
        is_best = line.startswith(night.best.commit[:7]) and "\tkeep\t" in line
        out.append(line + ("   <- best so far" if is_best else ""))
    if not greedy and night.sigma:
        need = margin(night.sigma, 1, max(len(night.best_vals), 1))
        out.append(f"\nNoise floor: val_bpb varies by about {night.sigma:.6f} (std) between seeds of "
                   f"the same code; a win must beat the best by about {need:.6f}"
                   " or it is re-run on other seeds to confirm.")
    return "\n".join(out)


def build(repo, settings, program_md, train_py, notebook, history, guidance):
    """(system, user): the parts of the first request, each (text, cacheable), the static ones first:
    the rules, prepare.py's fixed parts, program.md, the best train.py; then the notebook, the
    run's history and what is asked now (lessons owed, a plateau, the instruction)."""
    prepare_text = fixed_prepare_parts((Path(repo) / "prepare.py").read_text())
    in_force = ", ".join(f"{k.upper()} = {v}" for k, v in settings.items())
    system = [(SYSTEM_PROMPT, False),
              ("The fixed parts of prepare.py (read-only):\n\n```python\n" + prepare_text
               + f"\n```\n\nValues in force for this run: {in_force}.", True),
              ("program.md (the research instructions):\n\n" + program_md, True)]
    user = [("The current train.py:\n\n```python\n" + train_py + "\n```", True),
            ("The research notebook (runs/<tag>/notes.md: one line per finished experiment, by theme, with "
             "the lessons you wrote; the human may edit it too):\n\n" + (notebook.strip() or "(empty so far)"), False),
            ("Results of this run so far (results.tsv):\n\n" + history, False),
            (guidance + f"Propose the next experiment with the {TOOL_NAME} tool: a one-line description, a "
             "one-line hypothesis, its theme, and the edits.", False)]
    return system, user


def condense_request(notebook, max_chars):
    """(system, user) asking for the notebook rewritten shorter (no tool: plain markdown back)."""
    return ([("You keep a research notebook for an overnight ML research run.", False)],
            [(f"The notebook below is {len(notebook)} characters, more than the {max_chars} it may take. "
              f"Rewrite it in under {max_chars * 3 // 4} characters: keep the '## <theme>' sections, every kept "
              "change with its result, and the lessons that matter; merge entries that say the same. Reply with "
              "the whole notebook in markdown and nothing else.\n\n" + notebook, False)])
