"""The command line: flags, the checks that must pass before any GPU time, starting or
resuming a run, and `report`.

Usage: python driver.py [--tag nov22] [--max-experiments N] [--deadline 07:30] [--max-cost 20]
       python driver.py report [--tsv results.tsv]
"""

import argparse
import datetime
import faulthandler
import os
import re
import signal
import sys
import time
from pathlib import Path

from autoresearch import cluster, decisions, experiment, llm, loop, page, records, sandbox, scoring, slots, training
from autoresearch.records import Best, JournalDamaged, Night, git
from autoresearch.report import report

DEFAULT_MODEL = "claude-sonnet-5-5"  # overridden by --model or AUTORESEARCH_MODEL
MAX_EXPERIMENTS = None             # experiments after the baseline; None = no limit
MAX_COST_USD = 0.0                 # stop before an experiment once spend reaches this; 0 = none
PLATEAU = 10                       # ideas without a kept change before the model is told of a plateau


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["report"]:
        args = report_parser().parse_args(argv[1:])
        journal = args.journal
        if journal is None and Path("runs/active_tag").exists() and args.tsv == "results.tsv":
            journal = f"runs/{Path('runs/active_tag').read_text().strip()}/journal.json"
        if args.html or args.serve is not None:
            return night_page(args, journal)
        report(args.tsv, journal, args.png, as_json=args.json)
        return 0
    return drive(parser().parse_args(argv))


def parser():
    p = argparse.ArgumentParser(prog="driver.py", description="The overnight loop: an LLM edits train.py, "
                                "we train for a fixed budget, keep or revert.",
                                epilog="Summary and progress.png: python driver.py report")
    p.add_argument("--tag", default=time.strftime("%b%d").lower(),
                   help="run name: branch autoresearch/<tag>; an existing tag resumes (default: today, %(default)s)")
    p.add_argument("--model", default=os.environ.get("AUTORESEARCH_MODEL", DEFAULT_MODEL),
                   help="model id: Claude's, or with --provider openai any OpenAI-compatible server's "
                        "(\"openai:<id>\" selects that provider too) (default: $AUTORESEARCH_MODEL or %(default)s)")
    p.add_argument("--provider", choices=("anthropic", "openai"), default="anthropic",
                   help="the LLM API: Anthropic's Messages API, or OpenAI's Chat Completions (OpenAI, vLLM, Ollama, "
                        "llama.cpp, OpenRouter; pip install -e '.[openai]') (default: anthropic)")
    p.add_argument("--base-url", default=None, metavar="URL",
                   help="the OpenAI-compatible server, e.g. http://localhost:11434/v1 for Ollama (implies --provider "
                        "openai; default: $OPENAI_BASE_URL or OpenAI's)")
    p.add_argument("--price", default=None, metavar="IN,OUT",
                   help="USD per million input and output tokens, for a model whose price the driver does not know "
                        "(a local model: 0,0); then --max-cost works")
    p.add_argument("--llm-timeout", type=float, default=llm.LLM_TIMEOUT_S, metavar="SECONDS",
                   help="one LLM request's limit (a slow local model may need more; default: %(default)s)")
    p.add_argument("--plateau", type=int, default=PLATEAU, metavar="N",
                   help="after N ideas without a kept change, tell the model and ask for another kind of change "
                        "(0: never; default: %(default)s)")
    p.add_argument("--max-experiments", type=int, default=MAX_EXPERIMENTS, metavar="N",
                   help="stop after N experiments after the baseline (default: no limit)")
    p.add_argument("--deadline", default=None, metavar="WHEN",
                   help="no new experiment unless it can finish by then: 07:30, 8h or 90m (default: none)")
    p.add_argument("--max-cost", type=float, default=MAX_COST_USD, metavar="USD",
                   help="stop once the LLM spend reaches this (default: no cap)")
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help="kill a training run after this long (default: 2 x TIME_BUDGET + "
                        f"{training.TIMEOUT_ALLOWANCE_S:.0f} s, room for start-up, compilation and evaluation)")
    p.add_argument("--fix-attempts", type=int, default=loop.FIX_ATTEMPTS, metavar="N",
                   help="times a crashed run goes back to the LLM for a fix (default: %(default)s)")
    p.add_argument("--noise-runs", type=int, default=loop.NOISE_RUNS, metavar="N",
                   help="baseline runs on different seeds to measure the noise floor (default: %(default)s)")
    p.add_argument("--gpus", default=None, metavar="IDS",
                   help="one training slot per GPU: 0,1,2,3 or all (default: the one GPU training would use)")
    p.add_argument("--pipeline", choices=("on", "off"), default="on",
                   help="ask the LLM for the next ideas while runs train, so a slot never waits (off: one "
                        "experiment at a time, as before; default: on)")
    p.add_argument("--ray", default=None, metavar="ADDRESS",
                   help="run training as Ray tasks of one GPU each on this cluster (auto: the local one); "
                        "needs pip install -e '.[ray]'")
    p.add_argument("--greedy", action="store_true",
                   help="keep any run lower than the best: no noise floor, no confirmation runs")
    p.add_argument("--pass-env", action="append", default=[], metavar="NAME",
                   help="also pass this environment variable to train.py (repeatable; by default it gets "
                        "only PATH, HOME, locale, CUDA/NVIDIA/TORCH/TRITON/OMP and AUTORESEARCH_* variables)")
    p.add_argument("--sandbox", choices=("auto", "on", "off"), default="auto",
                   help="run train.py inside bubblewrap: own PID namespace, no network, read-only files but its "
                        "run directory and the compile cache (auto: when bwrap works, else say so; default: auto)")
    p.add_argument("--allow-network", action="store_true", help="let train.py use the network inside the sandbox")
    p.add_argument("--run-limits", default="", metavar="LIMITS",
                   help="what one run may use, e.g. written=64G,file=20G,output=2G,processes=2048; a run past one is "
                        f"a crash row that says which (default: {training.Limits().describe()})")
    p.add_argument("--allow-cpu", action="store_true",
                   help="run without a CUDA GPU (tests, small AUTORESEARCH_* settings); the defaults "
                        "would time out every run on a CPU")
    return p


def report_parser():
    p = argparse.ArgumentParser(prog="driver.py report", description="Summarise a run and draw progress.png.")
    p.add_argument("--tsv", default="results.tsv", help="results file (default results.tsv)")
    p.add_argument("--journal", default=None, help="the run's journal (default runs/<active tag>/journal.json)")
    p.add_argument("--png", default="progress.png", help="plot to write (default progress.png)")
    p.add_argument("--json", action="store_true", help="print the whole summary as JSON (no plot)")
    p.add_argument("--html", action="store_true", help="write the night's page, runs/<tag>/report/index.html")
    p.add_argument("--serve", nargs="?", type=int, const=8000, default=None, metavar="PORT",
                   help="serve the night's page on http://HOST:PORT/ (default 8000); it refreshes itself")
    p.add_argument("--host", default="127.0.0.1", help="the address --serve listens on (default 127.0.0.1: this "
                   "machine only)")
    return p


def night_page(args, journal):
    """report --html / --serve: the night's page from its journal's folder."""
    if journal is None or not Path(journal).exists():
        raise SystemExit(f"autoresearch: no journal {journal or '(no active run)'}; give --journal "
                         "runs/<tag>/journal.json")
    run_dir = Path(journal).parent
    if args.serve is not None:
        return page.serve(run_dir, args.tsv, args.serve, args.host)
    print(f"wrote {page.write(run_dir, args.tsv)}")
    return 0


def drive(args):
    """Check, start or resume, then the loop; SIGTERM and SIGHUP end it like Ctrl-C."""
    repo = Path(git(Path.cwd(), "rev-parse", "--show-toplevel"))
    deadline, limits = parse_deadline(args.deadline), training.parse_limits(args.run_limits)  # (every flag
    slots.check_gpus(args.gpus)                                                               # before any write)
    prepare, settings, hashes = check_repo(args, repo)
    cuda = check_cuda(args.allow_cpu, args.gpus, judge=not args.ray)  # (with Ray each node's run judges its own)
    provider = make_provider(args.provider, args.model, args.base_url,
                                 llm.parse_price(args.price) if args.price else None, args.llm_timeout)
    provider.check_access()
    box = sandbox.choose(args.sandbox, args.allow_network, repo, cuda)
    night, run_dir = open_night(args, repo, settings, hashes)
    provider.limit_file = run_dir / "llm-limits.json"  # a request refused for its size is never sent again
    night.sandbox = box.describe()
    records.save_night(run_dir / "journal.json", night)
    work_slots = slots.make_slots(run_dir, args.gpus, cluster.connect(args.ray, repo) if args.ray else None)
    ctx = loop.Context(repo=repo, run_dir=run_dir, tag=args.tag, model=provider.model, llm=provider, prepare=prepare,
                       greedy=args.greedy, noise_runs=1 if args.greedy else max(1, args.noise_runs),
                       fix_attempts=args.fix_attempts, pass_env=tuple(args.pass_env), sandbox=box,
                       timeout_s=args.timeout or training.default_timeout_s(settings["time_budget"]),
                       max_experiments=args.max_experiments, deadline=deadline,
                       max_cost=args.max_cost, slots=work_slots,
                       lookahead=len(work_slots) if args.pipeline == "on" else 0, plateau=args.plateau, limits=limits,
                       git_config=records.read_git_config(repo))
    training.kill_stale_training(run_dir / "training.pid")  # (the driver before slots)
    scoring.remove_stale_dirs()
    if not ctx.price_known:
        print(f"note: no price known for model {provider.model}: tokens are counted, cost is not, and --max-cost "
              "cannot be enforced (--price IN,OUT sets one; a local model: --price 0,0)", flush=True)
    rule = "greedy (keep if lower)" if ctx.greedy else \
        f"noise-aware, {ctx.noise_runs} baseline runs, margin {decisions.CONFIRM_K} sigma"
    print(f"run {args.tag} on branch {night.branch}: model {provider.model} ({provider.name}), {rule}, timeout "
          f"{ctx.timeout_s:.0f} s, sandbox {night.sandbox}, {len(work_slots)} slot(s) "
          f"({', '.join(s.name for s in work_slots)}), pipeline {args.pipeline}; noise floor sigma = "
          f"{night.sigma if night.sigma is not None else 'not measured yet'}", flush=True)
    withheld = training.withheld_names(ctx.pass_env)
    if withheld:
        print(f"note: train.py does not get {len(withheld)} of your environment variables "
              f"({', '.join(withheld)}); --pass-env NAME passes one", flush=True)
    interrupted, previous = False, handle_stop_signals()
    try:
        loop.run_night(ctx, night)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        for s in previous:  # the clean-up itself is not interrupted
            signal.signal(s, signal.SIG_IGN)
        try:
            experiment.restore_best(ctx, night)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
    if interrupted:
        print(f"\ninterrupted; `python driver.py --tag {args.tag}` resumes this run", flush=True)
        return 130
    print(f"total: {night.done} experiments decided (the baseline's included), {len(night.rows)} runs, best "
          f"{experiment.short_best(night)}, "
          f"spend ${night.spend['usd']:.2f}, GPU {night.gpu_s['total'] / 3600:.2f} h "
          f"({night.gpu_s['noise'] / max(night.gpu_s['total'], 1e-9):.0%} on noise handling)")
    return 0


def handle_stop_signals():
    """SIGTERM and SIGHUP (a closed terminal, `kill`, a service manager) stop the run like Ctrl-C,
    so the training process group is ended; a signal set to be ignored (nohup) stays ignored.
    SIGUSR1 prints every thread's stack (where a driver that seems stuck is). Returns the previous
    handlers of SIGINT, SIGTERM and SIGHUP."""
    try:
        faulthandler.register(signal.SIGUSR1, file=sys.__stderr__, all_threads=True)
    except (AttributeError, ValueError, OSError):  # no real stderr (embedded, or a test capturing it)
        pass
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    for s in (signal.SIGTERM, signal.SIGHUP):
        if previous[s] is not signal.SIG_IGN:
            signal.signal(s, interrupt)
    return previous


def interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


# ---------------------------------------------------------------------------
# Checks before any GPU time
# ---------------------------------------------------------------------------

def check_repo(args, repo):
    """The tag, the scripts and the prepared data; returns (prepare module, settings, metric hashes)."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", args.tag):
        raise SystemExit(f"autoresearch: --tag {args.tag!r}: use letters, digits, '.', '_' or '-' (e.g. nov22)")
    for name in ("train.py", "prepare.py"):
        if not (repo / name).exists():
            raise SystemExit(f"autoresearch: no {name} in {repo}; run the driver inside the autoresearch repository")
    if git(repo, "status", "--porcelain", "--", "prepare.py"):
        raise SystemExit("autoresearch: prepare.py has uncommitted changes; commit or revert them first (every "
                         "run trains in a worktree of a commit, so it uses the committed prepare.py)")
    prepare = training.load_prepare(repo)
    try:
        hashes = records.metric_hashes(repo, prepare)
    except SystemExit as e:  # data or tokenizer not prepared: say which command to run
        raise SystemExit(f"autoresearch: {str(e.code).removeprefix('error: ')}")
    return prepare, {key: getattr(prepare, key.upper()) for key in training.SETTINGS_KEYS}, hashes


def check_cuda(allow_cpu, gpus=None, judge=True):
    """True with a CUDA GPU (its device nodes exist from here on); without one, stop unless allowed.
    A GPU the slots would train on that has no bf16 stops the driver here, in one line. (Reading a
    GPU's properties makes no CUDA context: the driver holds no GPU memory.)"""
    import torch
    if torch.cuda.is_available():
        for i in slot_devices(gpus, torch.cuda.device_count()) if judge else ():
            major, minor = torch.cuda.get_device_capability(i)
            if (major, minor) < (8, 0):
                raise SystemExit(f"autoresearch: GPU {i} ({torch.cuda.get_device_name(i)}) has compute capability "
                                 f"{major}.{minor}, without bf16, which training needs: use a GPU of compute "
                                 "capability 8.0 or newer (A100, RTX 30xx, or newer; --gpus picks which)")
        return True
    if not allow_cpu:
        raise SystemExit("autoresearch: no CUDA GPU found (torch.cuda.is_available() is False): at the default "
                         "settings every run would time out on a CPU. Pass --allow-cpu to run anyway (with small "
                         "AUTORESEARCH_* settings and CAPS constants).")
    print("note: no CUDA GPU: training runs on the CPU (--allow-cpu)", flush=True)
    return False


def slot_devices(gpus, count):
    """torch's indices (in this process) of the GPUs --gpus trains on: None is the first, and a slot's
    id is a CUDA_VISIBLE_DEVICES value, read through this process's own CUDA_VISIBLE_DEVICES."""
    if gpus is None:
        return [0][:count]
    if gpus == "all":
        return list(range(count))
    visible = slots.visible_gpus()
    indices = [visible.index(g) if g in visible else int(g) if g.isdigit() and not visible else -1
               for g in slots.check_gpus(gpus)]
    return [i for i in indices if 0 <= i < count]


def make_provider(name, model, base_url=None, price=None, timeout_s=None):
    """The provider for --provider (or a model id "openai:<id>"); timeout_s: one request's limit."""
    if model.startswith("openai:"):
        name, model = "openai", model.removeprefix("openai:")
    if name == "openai" or base_url:
        from autoresearch.openai_api import OpenAIProvider
        return OpenAIProvider(model, base_url, price, timeout_s or llm.LLM_TIMEOUT_S)
    return llm.AnthropicProvider(model, price or llm.model_price(model), timeout_s or llm.LLM_TIMEOUT_S)


def parse_deadline(text, now=None):
    """'07:30' (next such local time), '8h', '90m' or a number of hours -> epoch seconds."""
    now = now or datetime.datetime.now()
    if not text:
        return None
    m = re.fullmatch(r"(\d{1,2}):(\d{2})", text.strip())
    if m:
        t = now.replace(hour=int(m[1]), minute=int(m[2]), second=0, microsecond=0)
        return (t if t > now else t + datetime.timedelta(days=1)).timestamp()
    m = re.fullmatch(r"([\d.]+)\s*([hm]?)", text.strip())
    if not m:
        raise SystemExit(f"autoresearch: --deadline {text!r}: give a time like 07:30 or a duration like 8h or 90m")
    return now.timestamp() + float(m[1]) * (60 if m[2] == "m" else 3600)


# ---------------------------------------------------------------------------
# Starting or resuming a run
# ---------------------------------------------------------------------------

def open_night(args, repo, settings, hashes):
    """The journal (new, resumed or rebuilt), the branch checked out, results.tsv in step with it.
    A new run's journal is written before its branch exists, so a kill between the two resumes."""
    run_dir = repo / "runs" / args.tag
    journal, tsv = run_dir / "journal.json", repo / "results.tsv"
    branch = f"autoresearch/{args.tag}"
    park_results(repo, args.tag)
    if journal.exists():
        try:
            night = records.load_night(journal, tsv)
        except JournalDamaged as error:
            night = recover_night(repo, args.tag, branch, settings, hashes, run_dir, error)
        if night.settings != settings:
            raise SystemExit(f"autoresearch: run {args.tag} started with {night.settings} but the settings now "
                             f"are {settings}; restore the AUTORESEARCH_* overrides or use a new --tag")
        if night.metric_hashes != hashes:
            raise SystemExit(f"autoresearch: prepare.py or the prepared data changed since run {args.tag} started; "
                             "its results would not be comparable. Use a new --tag.")
        if not git(repo, "rev-parse", "--verify", "-q", branch, check=False):  # killed before it was made
            git(repo, "branch", branch, night.best.commit)
        if git(repo, "symbolic-ref", "-q", "HEAD", check=False) != f"refs/heads/{branch}":
            git(repo, "checkout", "-q", branch)
        if not night.best_vals and not night.in_flight:  # the baseline failed: start from the fix
            night.best.commit = git(repo, "rev-parse", "HEAD")
            records.save_night(journal, night)
        print(f"resuming run {args.tag}: {len(night.rows)} rows, best {experiment.short_best(night)}")
    else:
        if git(repo, "rev-parse", "--verify", "-q", branch, check=False):
            raise SystemExit(f"autoresearch: branch {branch} exists but has no journal in {run_dir}; "
                             "choose another --tag")
        if git(repo, "status", "--porcelain", "--", "train.py"):
            raise SystemExit("autoresearch: train.py has uncommitted changes; commit or revert them "
                             "first (the baseline is the committed train.py)")
        run_dir.mkdir(parents=True, exist_ok=True)
        night = Night(tag=args.tag, branch=branch, started=time.strftime("%Y-%m-%d %H:%M:%S"), settings=settings,
                      metric_hashes=hashes, best=Best(git(repo, "rev-parse", "HEAD"), "baseline"), groups={},
                      sigma=None, rows=[], next_n=0, next_seed=experiment.BASE_SEED,
                      tried=[records.sha256_bytes((repo / "train.py").read_bytes())],
                      gpu_s={"total": 0.0, "noise": 0.0}, run_counts={"total": 0, "noise": 0},
                      wins_rejected=0, spend={"usd": 0.0}, in_flight=[])
        if tsv.exists():  # left by a run whose journal is gone: keep it aside
            os.replace(tsv, run_dir / f"results-orphaned-{int(time.time())}.tsv")
        records.save_json(run_dir / "run.json", {"settings": settings, "metric_hashes": hashes})  # never rewritten
        records.save_night(journal, night)
        git(repo, "checkout", "-q", "-b", branch)
    decided = [row for p in night.in_flight if p.final for row in p.final.rows]  # a kill while recording them
    note = records.sync_tsv(tsv, night.rows + decided, run_dir)
    if note:
        print(f"note: {note}", flush=True)
    return night, run_dir


def recover_night(repo, tag, branch, settings, hashes, run_dir, error):
    """A journal cut short or emptied: rebuild the state from results.tsv and the branch, or
    say exactly how to go on."""
    journal, tsv = run_dir / "journal.json", repo / "results.tsv"
    lines = tsv.read_text().splitlines(True)[1:] if tsv.exists() else []
    lines = [line for line in lines if line.endswith("\n") and len(line.split("\t")) == 5]
    if not lines or not git(repo, "rev-parse", "--verify", "-q", branch, check=False):
        raise SystemExit(f"autoresearch: {journal} is damaged ({error}) and there is nothing to rebuild it from "
                         f"(no rows in results.tsv or no branch {branch}); move it aside and start a new run: "
                         f"`python driver.py --tag {tag}-2`")
    identity = run_dir / "run.json"  # the settings and metric the run started with, kept apart
    if identity.exists():
        started = records.load_json(identity)
        settings, hashes = started["settings"], started["metric_hashes"]
    night = records.rebuild_night(repo, tag, branch, settings, hashes, lines, run_dir, experiment.BASE_SEED,
                                  run_s=settings["time_budget"])
    aside = records.set_aside(journal, "damaged")
    records.save_night(journal, night)
    print(f"autoresearch: {journal} was damaged ({error}); kept it as {aside.name} and rebuilt the run from "
          f"results.tsv and {branch}: {len(lines)} rows, best {experiment.short_best(night)} (the LLM spend and GPU "
          "time before now are not known)", flush=True)
    return night


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
    records.write_atomic(active_file, tag + "\n")
