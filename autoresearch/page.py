"""The night as a page: runs/<tag>/report/index.html, one self-contained file (no network, opens
from disk), rewritten atomically after every decision and served on localhost by
`python driver.py report --serve`, where it refreshes itself.

Each decided experiment leaves runs/<tag>/NNNN/experiment.json (experiment_record): what it was,
its runs with their loss curves, its diff against its parent and the decision in words. The page
is built from those, results.tsv, the journal and notes.md (page_data), rendered with Jinja2 (its
data escaped into one JSON block: no text a model or train.py wrote can become markup), and drawn
by the page's own script.
"""

import difflib
import functools
import http.server
import math
import re
import statistics
import time
from pathlib import Path

from autoresearch import decisions, prompt, records, report

CURVE_POINTS = 150                 # most points of a run's loss curve on the page
LOG_HEAD_BYTES = 16 << 20          # a log is read this far for its loss curve (a run can print without bound)
LOG_TAIL_BYTES = 6000              # the end of a failed run's log that the page shows
DIFF_CHARS = 20_000                # a diff longer than this is cut on the page (git log -p has it whole)
REFRESH_S = 10                     # a served page looks for a newer version this often
TEMPLATE = Path(__file__).with_name("page.html")
STEP_LINE = re.compile(r"step (\d{1,9}) \([\d.]+%\) \| loss: (\d{1,12}(?:\.\d{1,12})?(?:[eE][-+]?\d{1,3})?)\b")


# ---------------------------------------------------------------------------
# One experiment's record, written when it is decided
# ---------------------------------------------------------------------------

def loss_curve(log_path):
    """[[step, smoothed training loss], ...] from a run's progress lines, at most CURVE_POINTS."""
    try:
        text = records.read_head(log_path, LOG_HEAD_BYTES)
    except OSError:
        return []
    points = [[int(s), float(v)] for s, v in STEP_LINE.findall(text) if math.isfinite(float(v))]
    stride = max(1, -(-len(points) // CURVE_POINTS))
    return points[::stride] + (points[-1:] if points and (len(points) - 1) % stride else [])


def train_py_diff(repo, parent, commit):
    """train.py's unified diff from the parent's code to the experiment's ("" without both)."""
    if not parent or not commit:
        return ""
    try:
        before, after = records.train_py_at(repo, parent), records.train_py_at(repo, commit)
    except Exception:  # noqa: BLE001  (a commit git no longer has: the page goes without the diff)
        return ""
    diff = "".join(difflib.unified_diff(before.splitlines(True), after.splitlines(True), "parent/train.py",
                                        "experiment/train.py"))
    return diff if len(diff) <= DIFF_CHARS else diff[:DIFF_CHARS] + "\n[... the rest of the diff is cut]\n"


def decision_words(ctx, p, final, vals, parent_vals, sigma):
    """The decision in words: the rule, the runs it used (`vals`: the current attempt's), the margin."""
    if final.status == "crash":
        failed = [r for r in p.runs if r.val_bpb is None]  # (runs side by side end in any order)
        return f"crash: {failed[-1].failure if failed else final.note or 'no run'}"
    if p.kind == "baseline":
        return f"the baseline: {len(vals)} run(s) on different seeds measure the noise floor"
    mean = statistics.fmean(vals) if vals else None
    parent = statistics.fmean(parent_vals) if parent_vals else None
    text = [f"{final.status}: mean {mean:.6f} over {len(vals)} run(s)" if mean is not None else final.status]
    if parent is not None and mean is not None:
        text.append(f"its parent (the best when it ran) {parent:.6f} over {len(parent_vals)} run(s), "
                    f"a difference of {mean - parent:+.6f}")
    if ctx.greedy or not sigma:
        text.append("rule: greedy, kept if lower" + ("" if ctx.greedy else " (no noise floor measured yet)"))
    elif mean is not None and parent_vals:
        need = decisions.margin(sigma, len(vals), len(parent_vals))
        text.append(f"rule: kept when better by the margin {decisions.CONFIRM_K:g} sigma x sqrt(1/{len(vals)} + "
                    f"1/{len(parent_vals)}) = {need:.6f} (sigma {sigma:.6f}); a first run better by less is "
                    f"re-run on fresh seeds, up to {decisions.CONFIRM_RUNS}")
    if final.note:
        text.append(final.note)
    return "; ".join(text)


def experiment_record(ctx, night, p, final, vals, parent_vals, sigma):
    """Save runs/<tag>/NNNN/experiment.json: what the page shows of a decided experiment (`vals`: the
    val_bpb of its current attempt's runs; `parent_vals`, `sigma`: what it was judged against)."""
    usage = Path(p.dir) / "usage.json"
    code = p.commit if p.kind != "baseline" else (p.runs[0].commit if p.runs else night.best.commit)
    runs = []
    for r in p.runs:
        run = {"role": r.role, "seed": r.seed, "attempt": r.attempt, "val_bpb": r.val_bpb,
               "seconds": round(r.seconds, 1), "failure": r.failure, "device_batch": r.device_batch, "note": r.note,
               "log": str(Path(r.log).relative_to(ctx.run_dir)) if Path(r.log).is_relative_to(ctx.run_dir) else r.log,
               "curve": loss_curve(r.log)}
        if r.val_bpb is None and Path(r.log).exists():
            run["tail"] = prompt.mask_secrets(records.read_tail(r.log, LOG_TAIL_BYTES).replace("\r", "\n"))
        runs.append(run)
    mean = statistics.fmean(vals) if vals else None
    parent = statistics.fmean(parent_vals) if parent_vals else None
    record = {"n": p.n, "kind": p.kind, "description": p.description, "fix_description": p.fix_description,
              "hypothesis": p.hypothesis, "theme": p.theme or ("baseline" if p.kind == "baseline" else "other"),
              "status": final.status, "note": final.note, "rows": final.rows, "commit": code, "parent": p.parent,
              "mean": mean, "delta": mean - parent if mean is not None and parent is not None else None,
              "sigma": sigma, "delta_sigma": (mean - parent) / sigma if mean is not None and parent is not None
              and sigma else None, "decision": decision_words(ctx, p, final, vals, parent_vals, sigma),
              "usd": records.load_json(usage)["usd"] if usage.exists() else 0.0, "decided": round(time.time(), 1),
              "runs": runs, "diff": train_py_diff(ctx.repo, p.parent, p.commit) if p.kind != "baseline" else "",
              "lesson": ""}
    records.save_json(Path(p.dir) / "experiment.json", record)


def quietly(what, fn, *args):
    """fn(*args) for the driver: a page, or an experiment's record for it, that cannot be written is a
    note, never the end of the night (whatever a run printed)."""
    try:
        return fn(*args)
    except Exception as error:  # noqa: BLE001
        print(f"  note: {what} was not written: {type(error).__name__}: {error}", flush=True)


def add_lesson(exp_dir, lesson):
    """The model's lesson for a decided experiment, on its page record too."""
    path = Path(exp_dir) / "experiment.json"
    if path.exists():
        record = records.load_json(path)
        record["lesson"] = lesson
        records.save_json(path, record)


# ---------------------------------------------------------------------------
# The page: its data, written, served
# ---------------------------------------------------------------------------

RECORD = {"n": None, "kind": "candidate", "description": "", "fix_description": "", "hypothesis": "", "theme": "other",
          "status": "", "note": "", "rows": [], "commit": None, "parent": None, "mean": None, "delta": None,
          "sigma": None, "delta_sigma": None, "decision": "", "usd": 0.0, "runs": [], "diff": "", "lesson": ""}


def read_records(run_dir):
    """Every decided experiment's record, by number; one that cannot be read (being rewritten,
    damaged, from another version) is left out or given the keys it lacks."""
    found = []
    for path in sorted(Path(run_dir).glob("[0-9][0-9][0-9][0-9]/experiment.json")):
        try:
            record = records.load_json(path)
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and type(record.get("n")) is int and isinstance(record.get("runs", []), list):
            found.append({**RECORD, **record})
    return sorted(found, key=lambda e: e["n"])


def finite(value):
    """value with every float that is not finite made None (JSON has no NaN or Infinity)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return value


def page_data(run_dir, tsv_path):
    """Everything the page shows, as plain data (what the template embeds as JSON)."""
    run_dir, tsv_path = Path(run_dir), Path(tsv_path)
    lines = tsv_path.read_text().splitlines(True)[1:] if tsv_path.exists() else []
    rows = [(line, row) for line, row in ((line, records.parse_row(line)) for line in lines) if row]
    night = report.read_night(run_dir / "journal.json", tsv_path)
    experiments = read_records(run_dir)
    row_of = {line: e["n"] for e in experiments for line in e["rows"] if isinstance(line, str)}
    points = [{"i": i, "val": r["val_bpb"], "status": r["status"], "extra": records.is_extra_run(r),
               "unconfirmed": "not confirmed" in r["description"], "n": row_of.get(line),
               "text": r["description"][:160]} for i, (line, r) in enumerate(rows)]
    summary = report.summary([r for _, r in rows], night)
    summary["crashed"] = sum(r["status"] == "crash" for r in report.idea_rows([r for _, r in rows]))
    if night and night.in_flight:
        summary["in_flight"] = [{"n": p.n, "description": p.description, "runs": len(p.runs)} for p in night.in_flight]
    notes = run_dir / "notes.md"
    return finite({"tag": night.tag if night else run_dir.name, "written": time.strftime("%Y-%m-%d %H:%M:%S"),
                   "stamp": f"{time.time():.6f}", "summary": summary, "points": points, "experiments": experiments,
                   "timeline": night.finished if night else [], "started": night.started if night else "",
                   "notes": notes.read_text(errors="replace") if notes.exists() else "", "refresh_s": REFRESH_S})


def write(run_dir, tsv_path):
    """Render the page into runs/<tag>/report/index.html (atomically), then its stamp (what a served
    page watches); returns its path."""
    import jinja2
    data = page_data(run_dir, tsv_path)
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    html = env.from_string(TEMPLATE.read_text()).render(data=data, tag=data["tag"])
    out = Path(run_dir) / "report"
    out.mkdir(exist_ok=True)
    records.write_atomic(out / "index.html", html)
    records.write_atomic(out / "stamp.txt", data["stamp"] + "\n")
    return out / "index.html"


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # (no line per request)
        pass

    def end_headers(self):
        self.send_header("Cache-Control", "no-store")
        super().end_headers()


def server(run_dir, tsv_path, port=8000, host="127.0.0.1"):
    """An HTTP server of runs/<tag>/report/ (the page written first) on host:port (0: any free port)."""
    page = write(run_dir, tsv_path)
    return http.server.ThreadingHTTPServer((host, port), functools.partial(QuietHandler, directory=str(page.parent)))


def serve(run_dir, tsv_path, port=8000, host="127.0.0.1"):
    """Serve the page at http://host:port/ until Ctrl-C; it reloads itself when the driver rewrites it."""
    with server(run_dir, tsv_path, port, host) as httpd:
        print(f"serving {Path(run_dir) / 'report'} at http://{host}:{httpd.server_address[1]}/ (Ctrl-C stops; "
              "the page follows the night while the driver runs)", flush=True)
        try:
            httpd.serve_forever()
        except KeyboardInterrupt:
            pass
    return 0
