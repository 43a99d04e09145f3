"""The overnight loop: an LLM edits train.py, we train for a fixed budget, keep or revert.

Each experiment: read program.md afresh, ask the LLM (Anthropic Messages API, tool use)
for one idea as search/replace edits to train.py, validate them, commit train.py alone
on the branch autoresearch/<tag>, run `python train.py` time-boxed in its own process
group, parse val_bpb from the summary block, then keep the commit or move the branch
back to the best one. Every run is a row in results.tsv; prompt, reply, diff, log and
cost of each experiment are kept under runs/<tag>/<NNNN>/.

Decisions are noise-aware (unless --greedy): the spread of val_bpb between seeds of the
same code (the noise floor, sigma) is measured at the start and refined from repeats.
A candidate must beat the best by the margin

    CONFIRM_K * sigma * sqrt(1/n_candidate + 1/n_best)

(the difference of two means of n independent runs has standard deviation
sigma*sqrt(1/n1 + 1/n2), so K = 2 lets a no-better change through about 2% of the time).
Clearly better on one run: kept at once. Better, but by less than the margin: re-run on
fresh seeds (and the best too, while it has fewer runs) and kept only if the mean still
beats the best's mean by the margin; else recorded as "not confirmed".

Files: results.tsv (one row per run, untracked), runs/<tag>/journal.json (the run's state,
written atomically: a killed driver resumes from it), runs/<tag>/<NNNN>/ (prompt.json,
reply.json, diff.patch, train.log, usage.json), discarded attempts under the git refs
refs/autoresearch/<tag>/discarded/<NNNN>.

Usage: python driver.py [--tag nov22] [--max-experiments N] [--deadline 07:30] [--max-cost 20]
       python driver.py report [--tsv results.tsv]
"""

import argparse
import ast
import datetime
import difflib
import hashlib
import importlib.util
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# ---------------------------------------------------------------------------
# Settings (defaults of the command-line flags; edit here or pass flags)
# ---------------------------------------------------------------------------

DEFAULT_MODEL = "claude-sonnet-5-5"  # overridden by --model or AUTORESEARCH_MODEL
MAX_EXPERIMENTS = None             # experiments after the baseline; None = no limit
MAX_COST_USD = 0.0                 # stop before an experiment once spend reaches this; 0 = none
FIX_ATTEMPTS = 2                   # times a crashed run goes back to the LLM for a fix
EDIT_ATTEMPTS = 3                  # times an invalid edit goes back to the LLM
NOISE_RUNS = 3                     # runs of the baseline (different seeds) to measure the noise floor
CONFIRM_RUNS = 3                   # most runs of a marginal candidate, its first run included
CONFIRM_K = 2.0                    # margin = K * sigma * sqrt(1/n1 + 1/n2)
CONFIRM_MIN_K = 0.5                # a first run must beat the best by this many sigmas to earn repeats
NOISE_BUDGET_FRACTION = 0.2        # share of all runs that noise runs and repeats may take ...
NOISE_BUDGET_GRACE_RUNS = 5        # ... plus this many (the start-up noise runs, early confirmations)
BASE_SEED = 42                     # seed of every first run; repeats take BASE_SEED+1, +2, ...
LLM_MAX_TOKENS = 16000             # longest reply, thinking included
LLM_TIMEOUT_S = 600.0              # one request
LLM_BACKOFF_S = 2.0                # first wait after a transient API error, doubled each time
LLM_BACKOFF_MAX_S = 300.0          # longest wait between retries (retries never give up)
KILL_GRACE_S = 10.0                # SIGTERM to SIGKILL of the training process group
LOG_TAIL_LINES = 60                # log lines sent to the LLM after a crash
TSV_HEADER = "commit\tval_bpb\tmemory_gb\tstatus\tdescription\n"
TOOL_NAME = "edit_train_py"

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

SECRET_ENV_RE = re.compile(r"API_?KEY|TOKEN|SECRET|PASSW|CREDENTIAL|^ANTHROPIC_|^OPENAI_|^CLAUDE_")
SETTINGS_KEYS = ("max_seq_len", "time_budget", "eval_tokens")
PREPARE_API = ("MAX_SEQ_LEN", "TIME_BUDGET", "EVAL_TOKENS", "VOCAB_SIZE", "SEED", "Tokenizer",
               "get_token_bytes", "make_dataloader", "evaluate_bpb")  # shown to the model
EXTRA_RUN_RE = re.compile(r"^(repeat|noise run)\b")  # descriptions of rows that are not new ideas

SYSTEM_PROMPT = f"""You are an autonomous ML researcher. Each turn you propose ONE experiment:
a change to train.py that you expect to lower val_bpb (validation bits per byte) within the
fixed training time budget. Reply only by calling the {TOOL_NAME} tool with a short honest
description (one line, what you changed) and exact search/replace edits: each `search` must
occur exactly once in the current train.py (copy it character for character, whitespace
included); edits apply in order. Only train.py can change. The metric, the data and
prepare.py are fixed. The driver sets the seed through AUTORESEARCH_SEED; changing the seed
is not an experiment and never counts as a win. If a run fails you get its log tail: fix the
cause with another edit to the file as you left it."""


@dataclass
class RunResult:
    """One training run: val_bpb is None when it failed, and failure says why."""
    val_bpb: float | None
    peak_vram_mb: float
    seconds: float
    failure: str


# ---------------------------------------------------------------------------
# Small helpers: git, files, the journal
# ---------------------------------------------------------------------------

def git(repo, *args, env=None, check=True):
    """Run git in the repo and return stdout; a failure stops with git's message (unless
    check=False: then a failure returns what git printed, usually nothing)."""
    proc = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise SystemExit(f"autoresearch: git {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout.strip()


def sha256_bytes(data):
    return hashlib.sha256(data).hexdigest()


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_atomic(path, text):
    """Write via tmp + fsync + rename so a kill leaves either the old or the new file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_json(path, obj):
    write_atomic(path, json.dumps(obj, indent=1, default=str) + "\n")


def load_prepare(repo):
    """Import the repo's prepare.py (constants and metric_files) without running anything."""
    spec = importlib.util.spec_from_file_location("prepare", Path(repo) / "prepare.py")
    module = importlib.util.module_from_spec(spec)
    previous = sys.modules.get("prepare")
    sys.modules["prepare"] = module  # dataclasses look their module up while it is executed
    try:
        spec.loader.exec_module(module)
    finally:
        if previous is None:
            sys.modules.pop("prepare", None)
        else:
            sys.modules["prepare"] = previous
    return module


def metric_hashes(repo, prepare):
    """Hashes of prepare.py and every prepared file the metric reads."""
    files = [Path(repo) / "prepare.py"] + [Path(p) for p in prepare.metric_files()]
    return {str(p): sha256_file(p) for p in files}


# ---------------------------------------------------------------------------
# results.tsv
# ---------------------------------------------------------------------------

def clean_description(text):
    """One line, no tabs: a description never breaks a TSV row."""
    return " ".join(str(text).split())[:300] or "(no description)"


def format_row(commit, val_bpb, peak_vram_mb, status, description):
    """One results.tsv line; a failed run reads 0.000000 and 0.0."""
    if val_bpb is None:
        val_bpb, peak_vram_mb = 0.0, 0.0
    description = clean_description(description)
    if description[0] in "=+-@":  # a spreadsheet would read it as a formula
        description = "'" + description
    return f"{commit[:7]}\t{val_bpb:.6f}\t{peak_vram_mb / 1024:.1f}\t{status}\t{description}\n"


def read_tsv(path):
    """Rows of results.tsv as dicts (val_bpb and memory_gb as floats)."""
    rows = []
    lines = Path(path).read_text().splitlines()
    for line in lines[1:]:
        parts = line.split("\t")
        if len(parts) != 5:
            continue
        rows.append({"commit": parts[0], "val_bpb": float(parts[1]), "memory_gb": float(parts[2]),
                     "status": parts[3], "description": parts[4]})
    return rows


def count_tsv_rows(path):
    """Complete rows in results.tsv; a torn last line (killed mid-write) is cut off."""
    if not path.exists():
        write_atomic(path, TSV_HEADER)
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)
        data = path.read_bytes()
    return max(0, data.count(b"\n") - 1)


def append_rows(path, lines):
    with open(path, "a") as f:
        f.write("".join(lines))
        f.flush()
        os.fsync(f.fileno())


# ---------------------------------------------------------------------------
# Asking the LLM
# ---------------------------------------------------------------------------

EDIT_TOOL = {
    "name": TOOL_NAME,
    "description": "Apply one experiment to train.py as exact search/replace edits.",
    "input_schema": {
        "type": "object",
        "properties": {
            "description": {"type": "string",
                            "description": "One short line: what this experiment changes."},
            "edits": {"type": "array", "description": "Applied in order to train.py.",
                      "items": {"type": "object",
                                "properties": {"search": {"type": "string"},
                                               "replace": {"type": "string"}},
                                "required": ["search", "replace"]}},
        },
        "required": ["description", "edits"],
    },
}


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


def history_text(tsv_path, best, sigma, greedy):
    """All rows of this run, the best marked, plus what counts as a win."""
    best_commit = best["commit"]
    lines = Path(tsv_path).read_text().splitlines()
    out = [lines[0] if lines else TSV_HEADER.strip()]
    for line in lines[1:]:
        is_best = best_commit and line.startswith(best_commit[:7]) and "\tkeep\t" in line
        out.append(line + ("   <- best so far" if is_best else ""))
    if not greedy and sigma:
        need = margin(sigma, 1, max(len(best["vals"]), 1))
        out.append(f"\nNoise floor: val_bpb varies by about {sigma:.6f} (std) between seeds of "
                   f"the same code; a win must beat the best by about {need:.6f}"
                   " or it is re-run on other seeds to confirm.")
    return "\n".join(out)


def build_request(model, repo, settings, program_md, train_py, history, messages_tail):
    """The Messages API request: the static parts first, with prompt-caching breakpoints."""
    prepare_text = fixed_prepare_parts((Path(repo) / "prepare.py").read_text())
    in_force = ", ".join(f"{k.upper()} = {v}" for k, v in settings.items())
    system = [
        {"type": "text", "text": SYSTEM_PROMPT},
        {"type": "text", "text": "The fixed parts of prepare.py (read-only):\n\n```python\n"
         + prepare_text + f"\n```\n\nValues in force for this run: {in_force}.",
         "cache_control": {"type": "ephemeral"}},
        {"type": "text", "text": "program.md (the research instructions):\n\n" + program_md,
         "cache_control": {"type": "ephemeral"}},
    ]
    first = {"role": "user", "content": [
        {"type": "text", "text": "The current train.py:\n\n```python\n" + train_py + "\n```",
         "cache_control": {"type": "ephemeral"}},
        {"type": "text", "text": "Results of this run so far (results.tsv):\n\n" + history},
        {"type": "text", "text": f"Propose the next experiment with the {TOOL_NAME} tool."},
    ]}
    # No forced tool_choice: current models think by default and answer a forced tool with a 400;
    # the prompt asks for the tool, and a reply without it is asked again.
    return {"model": model, "max_tokens": LLM_MAX_TOKENS, "system": system, "tools": [EDIT_TOOL],
            "messages": [first] + messages_tail}


def api_error_text(error):
    body = getattr(error, "body", None)
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return body["error"].get("message", "") or str(error)
    return str(error)


def call_llm(client, request):
    """messages.create with retries forever on transient errors; a key, permission or
    model problem (or any other refusal) stops the run with one clear message."""
    import anthropic
    delay_s = LLM_BACKOFF_S
    while True:
        try:
            return client.messages.create(**request)
        except anthropic.APIStatusError as e:
            code = e.status_code
            if not (code in (408, 409, 429) or code >= 500):
                hint = {401: "check ANTHROPIC_API_KEY",
                        403: "the key is not allowed to use this API or model",
                        404: f"unknown model {request['model']!r}: pass --model with a current model id"}
                raise SystemExit(f"autoresearch: the LLM API refused the request ({code}): "
                                 f"{api_error_text(e)} - {hint.get(code, 'fix the request and restart')}")
            retry_after = e.response.headers.get("retry-after", "") if e.response is not None else ""
            wait_s = max(delay_s, min(float(retry_after), LLM_BACKOFF_MAX_S)) \
                if retry_after.replace(".", "", 1).isdigit() else delay_s
            what = f"HTTP {code} ({api_error_text(e)})"
        except anthropic.APIConnectionError as e:
            wait_s, what = delay_s, f"connection problem ({e.__class__.__name__})"
        print(f"  LLM API: {what}; retrying in {wait_s:.1f} s", flush=True)
        time.sleep(wait_s)
        delay_s = min(delay_s * 2, LLM_BACKOFF_MAX_S)


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


def model_price(model):
    keys = [k for k in PRICES_PER_MTOK if model.startswith(k)]
    return PRICES_PER_MTOK[max(keys, key=len)] if keys else None


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
                                                  [l.strip() for l in new.split("\n")], n=1)
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
    changed = [l for l in difflib.ndiff(source.splitlines(), new.splitlines())
               if l[:2] in ("- ", "+ ") and l[2:].strip()]
    if changed and all("seed" in l.lower() for l in changed):
        return None, "the edit only changes the seed; a different seed is noise, not an experiment."
    return new, ""


def ask_llm(ctx, st, exp_dir, messages, source):
    """Ask for an edit until one validates (EDIT_ATTEMPTS). Returns (description, new source)
    or (None, None); messages (the conversation after the first user turn) grow in place."""
    program = ctx["repo"] / "program.md"
    best_py = best_train_py(ctx, st)
    for _ in range(EDIT_ATTEMPTS):
        program_md = program.read_text() if program.exists() else "(no program.md)"  # read afresh
        history = history_text(ctx["tsv"], st["best"], st["sigma"], ctx["greedy"])
        request = build_request(ctx["model"], ctx["repo"], st["settings"], program_md, best_py,
                                history, messages)
        save_json(exp_dir / "prompt.json", request)
        reply = call_llm(ctx["client"], request)
        replies_path = exp_dir / "reply.json"
        replies = json.loads(replies_path.read_text()) if replies_path.exists() else []
        save_json(replies_path, replies + [reply.model_dump(mode="json")])
        add_spend(ctx, st, exp_dir, reply.usage)
        # The assistant turn goes back verbatim: models that think (on by default since Claude 5)
        # reject a follow-up whose thinking blocks were dropped or altered.
        messages.append({"role": "assistant",
                         "content": [b.model_dump(mode="json", exclude_none=True) for b in reply.content]})
        tool = next((b for b in reply.content if b.type == "tool_use"), None)
        if tool is None:
            messages.append({"role": "user", "content": f"Reply by calling the {TOOL_NAME} tool."})
            continue
        args = tool.input if isinstance(tool.input, dict) else {}
        new, error = apply_edits(source, args.get("edits"), set(st["tried"]))
        if new is not None:
            st["tried"].append(sha256_bytes(new.encode()))
            save_json(exp_dir / "conversation.json", messages)
            return clean_description(args.get("description", "")), new
        print(f"  edit rejected: {error}", flush=True)
        messages.append({"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": tool.id, "is_error": True, "content": error}]})
    save_json(exp_dir / "conversation.json", messages)
    return None, None


def add_spend(ctx, st, exp_dir, usage):
    """Add one reply's tokens and cost to the run's total and to the experiment's usage.json."""
    counts, usd = usage_cost(ctx["model"], usage)
    path = exp_dir / "usage.json"
    per_exp = json.loads(path.read_text()) if path.exists() else {"usd": 0.0}
    for spend in (st["spend"], per_exp):
        for k, v in counts.items():
            spend[k] = spend.get(k, 0) + v
        spend["usd"] += usd or 0.0
    per_exp["price_known"] = usd is not None
    save_json(path, per_exp)
    save_state(ctx, st)  # spend is never lost, whatever happens next


# ---------------------------------------------------------------------------
# Running train.py
# ---------------------------------------------------------------------------

def training_env(seed):
    """The driver's environment minus anything that looks like a credential."""
    env = {k: v for k, v in os.environ.items()
           if k.startswith("AUTORESEARCH_") or not SECRET_ENV_RE.search(k.upper())}
    env["AUTORESEARCH_SEED"] = str(seed)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def kill_group(proc):
    """SIGTERM the whole process group, then SIGKILL whatever is left (grandchildren too)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=KILL_GRACE_S)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def number(text):
    """A summary value as a float (nan if it is not a number)."""
    try:
        return float(text)
    except (TypeError, ValueError):
        return float("nan")


def parse_summary(log_text):
    """key: value pairs of the last `---` block (regex, never an LLM)."""
    block = log_text.rsplit("\n---\n", 1)[-1] if "\n---\n" in log_text else \
        log_text[4:] if log_text.startswith("---\n") else ""
    return dict(re.findall(r"^([a-z_]+):[ \t]+(\S+)[ \t]*$", block, re.M))


def kill_stale_training(pid_file):
    """A driver killed with -9 leaves its training group running: end it before going on."""
    if not pid_file.exists():
        return
    pid = int(pid_file.read_text() or 0)
    try:
        if pid and b"train.py" in Path(f"/proc/{pid}/cmdline").read_bytes() and os.getpgid(pid) == pid:
            print(f"ending the training process group {pid} left by a previous driver", flush=True)
            os.killpg(pid, signal.SIGKILL)
    except (OSError, ProcessLookupError):
        pass  # already gone
    pid_file.unlink()


def summary_failure(summary, returncode, settings, seed):
    """Why a finished run's summary cannot be compared ("" when it can)."""
    if "val_bpb" not in summary:
        return f"no val_bpb in the output (exit code {returncode})"
    if not math.isfinite(number(summary["val_bpb"])):
        return f"val_bpb is {summary['val_bpb']}"
    for key in SETTINGS_KEYS:
        if number(summary.get(key)) != float(settings[key]):
            return (f"refused: the summary reports {key} {summary.get(key, '(missing)')} but "
                    f"the driver runs with {settings[key]}; evaluation settings must not change")
    if summary.get("seed") != str(seed):
        return (f"refused: the summary reports seed {summary.get('seed', '(missing)')} but the "
                f"driver set AUTORESEARCH_SEED={seed}; train.py must use and print that seed")
    return ""


def run_training(repo, log_path, seed, timeout_s, settings, pid_file):
    """Run `python train.py` time-boxed and judge its summary."""
    start = time.time()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "train.py"], cwd=repo, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=training_env(seed), start_new_session=True)
        write_atomic(pid_file, str(proc.pid))
        timed_out = False
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:  # also on Ctrl-C: never leave a training group behind
            kill_group(proc)
            pid_file.unlink(missing_ok=True)
    seconds = time.time() - start
    summary = parse_summary(Path(log_path).read_text(errors="replace"))
    if timed_out:
        failure = f"timed out after {timeout_s:.0f} s (the whole process group was killed)"
    else:
        failure = summary_failure(summary, proc.returncode, settings, seed)
    if failure:
        return RunResult(None, 0.0, seconds, failure)
    vram_mb = number(summary.get("peak_vram_mb"))
    return RunResult(float(summary["val_bpb"]), vram_mb if math.isfinite(vram_mb) else 0.0, seconds, "")


# ---------------------------------------------------------------------------
# Deciding (pure functions of the measured values)
# ---------------------------------------------------------------------------

def pooled_std(groups):
    """Standard deviation between runs of the same code, pooled over groups (None if no group
    has two runs)."""
    ss = sum(sum((v - statistics.fmean(g)) ** 2 for v in g) for g in groups if len(g) > 1)
    dof = sum(len(g) - 1 for g in groups if len(g) > 1)
    return math.sqrt(ss / dof) if dof else None


def margin(sigma, n_candidate, n_best):
    return CONFIRM_K * sigma * math.sqrt(1 / n_candidate + 1 / n_best)


def decide(candidate_vals, best_vals, sigma, greedy, no_repeat=""):
    """(action, note): action is keep, discard, repeat (candidate) or repeat_best; no_repeat
    says why no more runs may be spent on this candidate (empty: they may)."""
    cand, best = statistics.fmean(candidate_vals), statistics.fmean(best_vals)
    if greedy or not sigma:
        return ("keep", "") if cand < best else ("discard", "")
    n = len(candidate_vals)
    need = margin(sigma, n, len(best_vals))
    if best - cand > need:
        return "keep", "" if n == 1 else \
            f"confirmed: mean {cand:.6f} over {n} seeds vs best {best:.6f}, margin {need:.6f}"
    if n == 1 and best - cand <= CONFIRM_MIN_K * sigma * math.sqrt(1 + 1 / len(best_vals)):
        return "discard", ""
    note = f"not confirmed: mean {cand:.6f} over {n} seeds vs best {best:.6f}, margin {need:.6f}"
    if cand >= best or n >= CONFIRM_RUNS:
        return "discard", note
    if no_repeat:
        return "discard", f"{note} ({no_repeat})"
    return ("repeat_best" if len(best_vals) < n else "repeat"), note


def budget_allows(run_counts):
    """Another repeat fits in NOISE_BUDGET_FRACTION of all runs (plus a small grace). Runs
    share one time budget, so counting runs counts GPU time without timing jitter."""
    return run_counts["noise"] + 1 <= NOISE_BUDGET_FRACTION * (run_counts["total"] + 1) \
        + NOISE_BUDGET_GRACE_RUNS


# ---------------------------------------------------------------------------
# One experiment (resumable: its progress lives in the journal's "pending" entry)
# ---------------------------------------------------------------------------

def save_state(ctx, st):
    save_json(ctx["run_dir"] / "journal.json", st)


def attempt_runs(p, roles=("candidate",)):
    """The experiment's runs of the current attempt's code (a fix after a crash is a new attempt)."""
    return [r for r in p["runs"] if r["role"] in roles and r["attempt"] == p["attempt"]]


def measured(runs):
    """val_bpb of the runs that produced one."""
    return [r["val_bpb"] for r in runs if r["val_bpb"] is not None]


def best_train_py(ctx, st):
    """train.py of the best commit: the code the LLM is shown and edits."""
    return subprocess.run(["git", "show", f"{st['best']['commit']}:train.py"], cwd=ctx["repo"],
                          capture_output=True, text=True, check=True).stdout


def restore_best(ctx, st):
    """Branch back to the best commit and train.py from it; no other file is touched."""
    git(ctx["repo"], "reset", "-q", "--soft", st["best"]["commit"])
    git(ctx["repo"], "checkout", "-q", st["best"]["commit"], "--", "train.py")


def keep_discarded(ctx, name, commit):
    """A discarded attempt stays reachable (and its diff readable) under a ref."""
    git(ctx["repo"], "update-ref", f"refs/autoresearch/{ctx['tag']}/discarded/{name}", commit)


def commit_candidate(ctx, st, p):
    """Commit train.py alone on top of the best; a fixed date makes a re-commit after a
    restart produce the same commit."""
    repo = ctx["repo"]
    restore_best(ctx, st)
    (repo / "train.py").write_text(Path(p["source"]).read_text())
    date = f"{p['commit_date']} +0000"
    identity = [] if git(repo, "config", "user.email", check=False) else \
        ["-c", "user.name=autoresearch", "-c", "user.email=autoresearch@localhost"]
    message = p["description"] + (f" (fix: {p['fix_description']})" if p.get("fix_description") else "")
    git(repo, *identity, "commit", "-q", "--no-verify", "-m",
        f"{message}\n\nautoresearch {ctx['tag']} experiment {p['n']}", "--", "train.py",
        env={"GIT_AUTHOR_DATE": date, "GIT_COMMITTER_DATE": date})
    return git(repo, "rev-parse", "HEAD")


def one_run(ctx, st, p, role, seed):
    """Put the right code in train.py, train once, record the run in the pending entry."""
    repo = ctx["repo"]
    if role != "best" and git(repo, "rev-parse", "HEAD") != p.get("commit"):
        p["commit"] = commit_candidate(ctx, st, p)
        save_state(ctx, st)
    # a repeat of the best leaves the branch on the candidate and only swaps the file
    commit = st["best"]["commit"] if role == "best" else p["commit"]
    git(repo, "checkout", "-q", commit, "--", "train.py")
    k = len(p["runs"])
    log_path = Path(p["dir"]) / ("train.log" if k == 0 else f"train-{k + 1}.log")
    result = run_training(repo, log_path, seed, ctx["timeout_s"], st["settings"],
                          ctx["run_dir"] / "training.pid")
    if metric_hashes(repo, ctx["prepare"]) != st["metric_hashes"]:
        p["runs"].clear()  # numbers from a different metric are never compared or recorded
        restore_best(ctx, st)
        st["pending"] = None
        save_state(ctx, st)
        raise SystemExit("autoresearch: prepare.py or the prepared validation data changed during "
                         f"run {log_path}; results would not be comparable. Restore them (or "
                         "re-run `python prepare.py`) and start a new run with another --tag.")
    p["runs"].append({"role": role, "seed": seed, "commit": commit, "attempt": p["attempt"],
                      "val_bpb": result.val_bpb, "peak_vram_mb": result.peak_vram_mb,
                      "seconds": result.seconds, "failure": result.failure, "log": str(log_path)})
    if role == "best" and result.val_bpb is not None:
        st["best"]["vals"].append(result.val_bpb)  # the incumbent's mean sharpens with repeats
    st["gpu_s"]["total"] += result.seconds
    st["run_counts"]["total"] += 1
    if role != "candidate" or len(attempt_runs(p)) > 1:
        st["gpu_s"]["noise"] += result.seconds
        st["run_counts"]["noise"] += 1
    save_state(ctx, st)
    return result


def next_seed(st):
    st["next_seed"] += 1
    return st["next_seed"]


def ask_for_fix(ctx, st, p, failed):
    """Send the failed run's log tail back to the LLM; a valid fix becomes the next attempt.
    False when no valid fix came."""
    exp_dir = Path(p["dir"])
    messages = json.loads((exp_dir / "conversation.json").read_text())
    last_tool = next(b["id"] for b in reversed(messages[-1]["content"]) if b["type"] == "tool_use")
    tail = "\n".join(Path(failed["log"]).read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:])
    messages.append({"role": "user", "content": [{
        "type": "tool_result", "tool_use_id": last_tool, "is_error": True,
        "content": f"The run failed: {failed['failure']}.\n\nLast lines of its log:\n{tail}"
                   "\n\nFix train.py with another edit (edits apply to the file as you left it)."}]})
    if p.get("commit"):
        keep_discarded(ctx, f"{p['n']:04d}-{p['attempt'] + 1}", p["commit"])
    description, source = ask_llm(ctx, st, exp_dir, messages, Path(p["source"]).read_text())
    if source is None:
        return False
    p["attempt"] += 1
    p["fix_description"] = description
    p["source"] = str(exp_dir / f"candidate-{p['attempt'] + 1}.py")
    Path(p["source"]).write_text(source)
    p["commit"], p["commit_date"] = None, int(time.time())
    save_state(ctx, st)
    return True


def run_experiment(ctx, st, p):
    """Drive the pending experiment to its final rows: runs, fixes, repeats, decision."""
    while True:
        cand = attempt_runs(p)
        if not cand:
            one_run(ctx, st, p, "candidate", BASE_SEED)
            continue
        if cand[0]["val_bpb"] is None:  # the attempt's first run failed
            if p["kind"] == "baseline" or p["attempt"] >= ctx["fix_attempts"] \
                    or not ask_for_fix(ctx, st, p, cand[0]):
                return finish(ctx, st, p, "crash", "")
            continue
        if p["kind"] == "baseline":
            if len(p["runs"]) < ctx["noise_runs"]:
                one_run(ctx, st, p, "noise", next_seed(st))
                continue
            return finish(ctx, st, p, "keep", "")
        vals = measured(cand)
        no_repeat = "a repeat crashed" if any(r["val_bpb"] is None for r in cand[1:]) else \
            "" if budget_allows(st["run_counts"]) else "noise budget spent"
        action, note = decide(vals, st["best"]["vals"], st["sigma"], ctx["greedy"], no_repeat)
        if action == "repeat":
            one_run(ctx, st, p, "candidate", next_seed(st))
        elif action == "repeat_best":
            one_run(ctx, st, p, "best", next_seed(st))
        else:
            if note and len(vals) > 1 and len(set(vals)) == 1:
                action, note = "discard", "refused: identical val_bpb on different seeds " \
                    "(train.py ignores AUTORESEARCH_SEED)"
            return finish(ctx, st, p, action, note)


def experiment_rows(ctx, st, p, status, note):
    """results.tsv lines for every run of the experiment, each description saying what it was."""
    description = p["description"]
    if p.get("fix_description"):
        description += f" (fixed after a crash: {p['fix_description']})"
    lines, runs_in_group = [], {}
    for r in p["runs"]:
        group = (r["role"], r["attempt"])
        i = runs_in_group[group] = runs_in_group.get(group, 0) + 1  # run number within its group
        failed = r["val_bpb"] is None
        crash = f" [crash: {r['failure']}]" if failed else ""
        row_status = "keep"  # noise runs and repeats of the best are runs of kept code
        if r["role"] == "noise":
            text = f"noise run {i + 1}/{ctx['noise_runs']} (seed {r['seed']}): baseline{crash}"
        elif r["role"] == "best":
            text = f"repeat of best (seed {r['seed']}): {st['best']['description']}{crash}"
        else:
            text = (description if r["attempt"] == p["attempt"] else p["description"]) + crash
            if i > 1:
                text = f"repeat {i}/{CONFIRM_RUNS} (seed {r['seed']}): {text}"
            elif note and not failed:
                text += f" [{note}]"
            row_status = status
        lines.append(format_row(r["commit"], r["val_bpb"], r["peak_vram_mb"],
                                "crash" if failed else row_status, text))
    return lines


def finish(ctx, st, p, status, note):
    """Decide the rows, write them once, then move the branch; safe to repeat after a kill."""
    if "final" not in p:
        p["final"] = {"status": status, "rows": experiment_rows(ctx, st, p, status, note), "note": note}
        save_state(ctx, st)
    final = p["final"]
    have = count_tsv_rows(ctx["tsv"])
    missing = st["rows"] + len(final["rows"]) - have
    if missing > 0:
        append_rows(ctx["tsv"], final["rows"][len(final["rows"]) - missing:])
    vals = measured(attempt_runs(p, ("candidate", "noise")))
    if final["status"] == "keep":
        if p["kind"] != "baseline":
            st["best"] = {"commit": p["commit"], "description": p["description"], "vals": vals}
        else:
            st["best"]["vals"] = vals
    elif p.get("commit") and p["kind"] != "baseline":
        keep_discarded(ctx, f"{p['n']:04d}", p["commit"])
    if len(vals) > 1:
        st["groups"][p.get("commit") or st["best"]["commit"]] = vals
    st["groups"][st["best"]["commit"]] = st["best"]["vals"]
    st["sigma"] = pooled_std(list(st["groups"].values())) or st["sigma"]
    if "not confirmed" in final["note"]:
        st["wins_rejected"] += 1
    st["rows"] += len(final["rows"])
    st["pending"] = None
    save_state(ctx, st)
    restore_best(ctx, st)
    return final


# ---------------------------------------------------------------------------
# Start-up, the loop, the status line
# ---------------------------------------------------------------------------

def parse_deadline(text, now=None):
    """'07:30' (next such local time), '8h', '90m' or a number of hours → epoch seconds."""
    now = now or datetime.datetime.now()
    if not text:
        return None
    m = re.fullmatch(r"(\d{1,2}):(\d{2})", text.strip())
    if m:
        t = now.replace(hour=int(m[1]), minute=int(m[2]), second=0, microsecond=0)
        return (t if t > now else t + datetime.timedelta(days=1)).timestamp()
    m = re.fullmatch(r"([\d.]+)\s*([hm]?)", text.strip())
    if not m:
        raise SystemExit(f"autoresearch: --deadline {text!r}: give a time like 07:30 "
                         "or a duration like 8h or 90m")
    return now.timestamp() + float(m[1]) * (60 if m[2] == "m" else 3600)


def start_run(args, repo):
    """Branch, journal and results.tsv for a new or resumed run. Setup errors stop here."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", args.tag):
        raise SystemExit(f"autoresearch: --tag {args.tag!r}: use letters, digits, '.', '_' or '-' "
                         "(e.g. nov22)")
    for name in ("train.py", "prepare.py"):
        if not (repo / name).exists():
            raise SystemExit(f"autoresearch: no {name} in {repo}; "
                             "run the driver inside the autoresearch repository")
    prepare = load_prepare(repo)
    try:
        hashes = metric_hashes(repo, prepare)
    except SystemExit as e:  # data or tokenizer not prepared: say which command to run
        raise SystemExit(f"autoresearch: {str(e.code).removeprefix('error: ')}")
    settings = {key: getattr(prepare, key.upper()) for key in SETTINGS_KEYS}
    run_dir = repo / "runs" / args.tag
    journal = run_dir / "journal.json"
    branch = f"autoresearch/{args.tag}"
    current = git(repo, "rev-parse", "--abbrev-ref", "HEAD")
    park_results(repo, args.tag)
    if journal.exists():
        st = json.loads(journal.read_text())
        if current != branch:
            git(repo, "checkout", "-q", branch)
        if st["settings"] != settings:
            raise SystemExit(f"autoresearch: run {args.tag} started with {st['settings']} but the "
                             f"settings now are {settings}; restore the AUTORESEARCH_* overrides "
                             "or use a new --tag")
        if st["metric_hashes"] != hashes:
            raise SystemExit(f"autoresearch: prepare.py or the prepared data changed since run {args.tag} "
                             "started; its results would not be comparable. Use a new --tag.")
        if not st["best"]["vals"] and not st["pending"]:  # the baseline failed: start from the fix
            st["best"]["commit"] = git(repo, "rev-parse", "HEAD")
            save_json(journal, st)
        print(f"resuming run {args.tag}: {st['rows']} rows, best {short_best(st)}")
    else:
        if git(repo, "rev-parse", "--verify", "-q", branch, check=False):
            raise SystemExit(f"autoresearch: branch {branch} exists but has no journal in {run_dir}; "
                             "choose another --tag")
        if git(repo, "status", "--porcelain", "--", "train.py"):
            raise SystemExit("autoresearch: train.py has uncommitted changes; commit or revert them "
                             "first (the baseline is the committed train.py)")
        git(repo, "checkout", "-q", "-b", branch)
        run_dir.mkdir(parents=True, exist_ok=True)
        head = git(repo, "rev-parse", "HEAD")
        st = {"tag": args.tag, "branch": branch, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "settings": settings, "metric_hashes": hashes,
              "best": {"commit": head, "description": "baseline", "vals": []},
              "groups": {}, "sigma": None, "rows": 0, "next_n": 0, "next_seed": BASE_SEED,
              "tried": [sha256_bytes((repo / "train.py").read_bytes())],
              "gpu_s": {"total": 0.0, "noise": 0.0}, "run_counts": {"total": 0, "noise": 0},
              "wins_rejected": 0,
              "spend": {"usd": 0.0}, "pending": None}
        if (repo / "results.tsv").exists():  # left by a run whose journal is gone: keep it aside
            os.replace(repo / "results.tsv", run_dir / f"results-orphaned-{int(time.time())}.tsv")
        save_json(journal, st)
    return st, prepare, run_dir


def park_results(repo, tag):
    """results.tsv belongs to the active run: park another run's copy under runs/<its tag>/
    and bring this run's back if it was parked."""
    runs = repo / "runs"
    runs.mkdir(exist_ok=True)
    active_file, tsv = runs / "active_tag", repo / "results.tsv"
    active = active_file.read_text().strip() if active_file.exists() else ""
    if active != tag:
        if tsv.exists():
            dest = runs / (active or "before-autoresearch")
            dest.mkdir(exist_ok=True)
            os.replace(tsv, dest / ("results.tsv" if not (dest / "results.tsv").exists()
                                    else f"results-{int(time.time())}.tsv"))
        parked = runs / tag / "results.tsv"
        if parked.exists():
            os.replace(parked, tsv)
    write_atomic(active_file, tag + "\n")


def short_best(st):
    vals = st["best"]["vals"]
    return f"{statistics.fmean(vals):.6f} ({st['best']['commit'][:7]})" if vals else "none yet"


def status_line(ctx, st, p, final, best_before, minutes):
    """One line per experiment: number, val_bpb, delta vs best, status, minutes, cost, totals."""
    vals = measured(attempt_runs(p))
    mean = statistics.fmean(vals) if vals else None
    val = f"{mean:.6f}" if vals else "   -    "
    delta = f"{mean - best_before:+.6f}" if vals and best_before is not None else "    -    "
    sigma = f" sigma {st['sigma']:.6f}" if st["sigma"] and not ctx["greedy"] else ""
    usage_file = Path(p["dir"]) / "usage.json"
    cost = json.loads(usage_file.read_text())["usd"] if usage_file.exists() else 0.0
    cost_text = f"${cost:.3f}" if ctx["price_known"] else "$?"
    total = f"${st['spend']['usd']:.2f}" if ctx["price_known"] else "cost unknown"
    note = f" [{final['note']}]" if final["note"] else ""
    print(f"{p['n']:4d}  {val} ({delta})  {final['status']:7s} {minutes:5.1f} min {cost_text:>7s}  "
          f"{p['description'][:60]}{note}  | best {short_best(st)}{sigma}, {total}", flush=True)


def stop_reason(args, st, deadline):
    """Why no new experiment starts now ("" when one may)."""
    done = st["next_n"] - 1
    if args.max_experiments is not None and done >= args.max_experiments and st["best"]["vals"]:
        return f"{done} experiments done (--max-experiments)"
    typical_run_s = st["gpu_s"]["total"] / max(st["run_counts"]["total"], 1)
    if deadline and time.time() + typical_run_s >= deadline:
        return "the deadline comes before another run could finish"
    if args.max_cost and st["spend"]["usd"] >= args.max_cost:
        return f"spend ${st['spend']['usd']:.2f} reached --max-cost"
    return ""


def new_experiment(ctx, st):
    """The next pending entry: the baseline (the committed train.py) until one has run, then
    the LLM's next idea (None if no valid edit)."""
    n = st["next_n"]  # counted once the idea is pending, so a kill here re-asks under the same n
    exp_dir = ctx["run_dir"] / f"{n:04d}"
    exp_dir.mkdir(parents=True, exist_ok=True)
    if not st["best"]["vals"]:
        return {"n": n, "kind": "baseline", "description": "baseline", "dir": str(exp_dir),
                "source": str(ctx["repo"] / "train.py"), "commit": st["best"]["commit"],
                "commit_date": 0, "attempt": 0, "runs": []}
    best_py = best_train_py(ctx, st)
    description, source = ask_llm(ctx, st, exp_dir, [], best_py)
    if source is None:
        print(f"{n:4d}  no valid edit after {EDIT_ATTEMPTS} tries; asking for a new idea", flush=True)
        st["next_n"] = n + 1
        save_state(ctx, st)
        return None
    (exp_dir / "candidate.py").write_text(source)
    (exp_dir / "diff.patch").write_text("".join(difflib.unified_diff(
        best_py.splitlines(True), source.splitlines(True), "a/train.py", "b/train.py")))
    return {"n": n, "kind": "candidate", "description": description, "dir": str(exp_dir),
            "source": str(exp_dir / "candidate.py"), "commit": None, "commit_date": int(time.time()),
            "attempt": 0, "runs": []}


def drive(args):
    """The loop: baseline, then experiments until a stop condition."""
    import anthropic
    repo = Path(git(Path.cwd(), "rev-parse", "--show-toplevel"))
    st, prepare, run_dir = start_run(args, repo)
    ctx = {"repo": repo, "run_dir": run_dir, "tsv": repo / "results.tsv", "tag": args.tag,
           "model": args.model, "greedy": args.greedy, "prepare": prepare,
           "noise_runs": 1 if args.greedy else max(1, args.noise_runs),
           "fix_attempts": args.fix_attempts, "price_known": model_price(args.model) is not None,
           "timeout_s": args.timeout or 2 * st["settings"]["time_budget"],
           "client": anthropic.Anthropic(max_retries=0, timeout=LLM_TIMEOUT_S)}
    count_tsv_rows(ctx["tsv"])
    kill_stale_training(run_dir / "training.pid")
    deadline = parse_deadline(args.deadline)
    if not ctx["price_known"]:
        print(f"note: no price known for model {args.model}; cost is not counted and --max-cost "
              "cannot be enforced", flush=True)
    rule = "greedy (keep if lower)" if ctx["greedy"] else \
        f"noise-aware, {ctx['noise_runs']} baseline runs, margin {CONFIRM_K} sigma"
    print(f"run {args.tag} on branch {st['branch']}: model {args.model}, {rule}, timeout "
          f"{ctx['timeout_s']:.0f} s; noise floor sigma = "
          f"{st['sigma'] if st['sigma'] is not None else 'not measured yet'}", flush=True)
    try:
        restore_best(ctx, st)  # after a kill: branch and train.py back to the best
        while True:
            p = st["pending"]
            if p is None:
                reason = stop_reason(args, st, deadline)
                if reason:
                    print(f"stopping: {reason}")
                    break
                p = new_experiment(ctx, st)
                if p is None:
                    continue
                st["pending"] = p
                st["next_n"] = p["n"] + 1
                save_state(ctx, st)
            started = time.time()
            best_before = statistics.fmean(st["best"]["vals"]) if st["best"]["vals"] else None
            final = finish(ctx, st, p, None, None) if "final" in p else run_experiment(ctx, st, p)
            status_line(ctx, st, p, final, best_before, (time.time() - started) / 60)
            if p["kind"] == "baseline" and final["status"] == "crash":
                raise SystemExit(f"autoresearch: the baseline train.py failed: {p['runs'][-1]['failure']}; "
                                 f"see {p['runs'][-1]['log']}. Fix train.py, commit it on {st['branch']} "
                                 f"and run `python driver.py --tag {args.tag}` again.")
    except KeyboardInterrupt:
        print(f"\ninterrupted; `python driver.py --tag {args.tag}` resumes this run", flush=True)
        restore_best(ctx, st)
        return 130
    finally:
        if st.get("pending"):
            restore_best(ctx, st)
    print(f"total: {st['next_n']} experiments, {st['rows']} runs, best {short_best(st)}, "
          f"spend ${st['spend']['usd']:.2f}, GPU {st['gpu_s']['total'] / 3600:.2f} h "
          f"({st['gpu_s']['noise'] / max(st['gpu_s']['total'], 1e-9):.0%} on noise handling)")
    return 0


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------

def is_extra_run(row):
    """A repeat or noise run of code already in the table, not a new idea."""
    return bool(EXTRA_RUN_RE.match(row["description"]))


def idea_rows(rows):
    """The rows of the experiments after the baseline, one per idea."""
    return [r for r in rows if not is_extra_run(r) and not r["description"].startswith("baseline")]


def report(tsv_path, journal_path=None, png_path=None):
    """Summarise results.tsv (and the run's journal when there is one); draw progress.png."""
    tsv_path = Path(tsv_path)
    if not tsv_path.exists():
        raise SystemExit(f"autoresearch: no {tsv_path}; run `python driver.py` first")
    rows = read_tsv(tsv_path)
    st = json.loads(Path(journal_path).read_text()) if journal_path and Path(journal_path).exists() else None
    ideas = idea_rows(rows)
    kept = [r for r in ideas if r["status"] == "keep"]
    baseline = next((r for r in rows if r["description"] == "baseline" and r["status"] == "keep"), None)
    crashes = [r for r in ideas if r["status"] == "crash"]
    groups = {}
    for r in rows:
        if r["status"] != "crash":
            groups.setdefault(r["commit"], []).append(r["val_bpb"])
    sigma = pooled_std(list(groups.values()))
    lines = [f"experiments: {len(ideas)} after the baseline ({len(rows)} runs in all), kept "
             f"{len(kept)}, crash rate {len(crashes) / max(len(ideas), 1):.0%}"]
    if baseline:
        chain = [baseline] + kept
        base = statistics.fmean(groups[chain[0]["commit"]])
        best = statistics.fmean(groups[chain[-1]["commit"]])
        lines.append(f"val_bpb (mean over seeds): baseline {base:.6f} -> best {best:.6f} "
                     f"({best - base:+.6f}, {chain[-1]['commit']}: {chain[-1]['description']})")
        steps = [(statistics.fmean(groups[a["commit"]]) - statistics.fmean(groups[b["commit"]]), b)
                 for a, b in zip(chain, chain[1:])]
        if steps:
            lines.append("top improvements:")
            for gain, r in sorted(steps, key=lambda s: -s[0])[:5]:
                lines.append(f"  -{gain:.6f}  {r['commit']}  {r['description']}")
    lines.append("noise floor: " + (f"sigma = {sigma:.6f} val_bpb between seeds of the same code"
                                    if sigma else "not measured (no code run twice)"))
    rejected = sum("not confirmed" in r["description"] for r in ideas)
    lines.append(f"wins rejected as not confirmed: {rejected}")
    if st:
        gpu = st["gpu_s"]
        spend = st["spend"]
        lines.append(f"GPU time: {gpu['total'] / 3600:.2f} h, of which noise handling "
                     f"{gpu['noise'] / 3600:.2f} h ({gpu['noise'] / max(gpu['total'], 1e-9):.0%})")
        lines.append(f"spend: ${spend['usd']:.2f} ({spend.get('input', 0)} input, "
                     f"{spend.get('output', 0)} output, {spend.get('cache_read', 0)} cache-read, "
                     f"{spend.get('cache_write', 0)} cache-write tokens)")
    else:
        lines.append("spend and GPU time: no journal found (runs/<tag>/journal.json)")
    print("\n".join(lines))
    if png_path:
        plot_progress(rows, groups, sigma, png_path)
        print(f"wrote {png_path}")
    return lines


def plot_progress(rows, groups, sigma, png_path):
    """val_bpb per run, kept ones marked and labelled, the running best with its noise band."""
    try:
        import matplotlib
        import matplotlib.ticker
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[plot]'); no plot written")
        return
    fig, ax = plt.subplots(figsize=(13, 6.5))
    ok = [(i, r) for i, r in enumerate(rows) if r["status"] != "crash"]
    plain = [(i, r) for i, r in ok if r["status"] == "discard" and "not confirmed" not in r["description"]
             and not is_extra_run(r)]
    extra = [(i, r) for i, r in ok if is_extra_run(r)]
    unconfirmed = [(i, r) for i, r in ok if "not confirmed" in r["description"]]
    kept = [(i, r) for i, r in ok if r["status"] == "keep" and not is_extra_run(r)]
    confirmed = [(i, r) for i, r in kept if "confirmed:" in r["description"]]
    for pts, style in ((plain, dict(c="#b0b0b0", s=18, label="discarded")),
                       (extra, dict(c="#7fa7d9", s=14, marker="x", label="repeat / noise run")),
                       (unconfirmed, dict(c="#e08a2c", s=40, marker="v", label="better once, not confirmed")),
                       (kept, dict(c="#2a9d3a", s=55, edgecolors="black", zorder=3, label="kept")),
                       (confirmed, dict(c="#2a9d3a", s=140, marker="*", edgecolors="black", zorder=4,
                                        label="kept after confirmation"))):
        if pts:
            ax.scatter([i for i, _ in pts], [r["val_bpb"] for _, r in pts], **style)
    if kept:
        xs, ys, best = [], [], None
        keep_at = {i: statistics.fmean(groups[r["commit"]]) for i, r in kept}
        for i in range(len(rows)):
            best = keep_at.get(i, best)
            if best is not None:
                xs.append(i)
                ys.append(best)
        ax.step(xs, ys, where="post", c="#2a9d3a", lw=1.5, label="running best (mean over seeds)")
        if sigma:
            ax.fill_between(xs, [y - sigma for y in ys], [y + sigma for y in ys], step="post",
                            color="#2a9d3a", alpha=0.15, label=f"noise band ±σ (σ = {sigma:.5f})")
        for i, r in kept:
            ax.annotate(r["description"].split(" [")[0][:40], (i, r["val_bpb"]), textcoords="offset points",
                        xytext=(4, 6), rotation=25, fontsize=7.5, color="#1b5e20")
        vals = [r["val_bpb"] for _, r in ok]
        top = keep_at[kept[0][0]]
        span = max(top - min(vals), 1e-4)
        ax.set_ylim(min(vals) - 0.15 * span, top + 0.6 * span)  # worse runs beyond this are clipped
    crashes = sum(r["status"] == "crash" for r in rows)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel(f"run # ({len(rows)} runs, {crashes} crashed and not shown)")
    ax.set_ylabel("val_bpb (lower is better)")
    ideas = idea_rows(rows)
    ax.set_title(f"autoresearch progress: {sum(r['status'] == 'keep' for r in ideas)} kept of "
                 f"{len(ideas)} experiments after the baseline")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["report"]:
        parser = argparse.ArgumentParser(prog="driver.py report",
                                         description="Summarise a run and draw progress.png.")
        parser.add_argument("--tsv", default="results.tsv", help="results file (default results.tsv)")
        parser.add_argument("--journal", default=None,
                            help="the run's journal (default runs/<active tag>/journal.json)")
        parser.add_argument("--png", default="progress.png", help="plot to write (default progress.png)")
        args = parser.parse_args(argv[1:])
        journal = args.journal
        if journal is None and Path("runs/active_tag").exists() and args.tsv == "results.tsv":
            journal = f"runs/{Path('runs/active_tag').read_text().strip()}/journal.json"
        report(args.tsv, journal, args.png)
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Summary and progress.png: python driver.py report")
    parser.add_argument("--tag", default=time.strftime("%b%d").lower(),
                        help="run name: branch autoresearch/<tag>; an existing tag resumes "
                             "(default: today, %(default)s)")
    parser.add_argument("--model", default=os.environ.get("AUTORESEARCH_MODEL", DEFAULT_MODEL),
                        help="Claude model id (default: $AUTORESEARCH_MODEL or %(default)s)")
    parser.add_argument("--max-experiments", type=int, default=MAX_EXPERIMENTS, metavar="N",
                        help="stop after N experiments after the baseline (default: no limit)")
    parser.add_argument("--deadline", default=None, metavar="WHEN",
                        help="no new experiment unless it can finish by then: 07:30, 8h or 90m "
                             "(default: none)")
    parser.add_argument("--max-cost", type=float, default=MAX_COST_USD, metavar="USD",
                        help="stop once the LLM spend reaches this (default: no cap)")
    parser.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                        help="kill a training run after this long (default: 2 x TIME_BUDGET)")
    parser.add_argument("--fix-attempts", type=int, default=FIX_ATTEMPTS, metavar="N",
                        help="times a crashed run goes back to the LLM for a fix (default: %(default)s)")
    parser.add_argument("--noise-runs", type=int, default=NOISE_RUNS, metavar="N",
                        help="baseline runs on different seeds to measure the noise floor "
                             "(default: %(default)s)")
    parser.add_argument("--greedy", action="store_true",
                        help="keep any run lower than the best: no noise floor, no confirmation runs")
    return drive(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
