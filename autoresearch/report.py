"""The morning report: a summary of results.tsv (and the run's journal) and progress.png.
It reads the records only; it never changes them.
"""

import json
import statistics
from pathlib import Path

from autoresearch.decisions import pooled_std
from autoresearch.records import JournalDamaged, is_extra_run, load_night, read_tsv


def read_night(journal_path, tsv_path):
    """The run's state, or None when there is no readable journal."""
    if not journal_path or not Path(journal_path).exists():
        return None
    try:
        return load_night(journal_path, tsv_path)
    except JournalDamaged:
        return None


def idea_rows(rows):
    """The rows of the experiments after the baseline, one per idea."""
    return [r for r in rows if not is_extra_run(r) and not r["description"].startswith("baseline")]


def report(tsv_path, journal_path=None, png_path=None, as_json=False):
    """Summarise results.tsv (and the run's journal when there is one): as text and progress.png,
    or as JSON. Returns the text's lines."""
    tsv_path = Path(tsv_path)
    if not tsv_path.exists():
        raise SystemExit(f"autoresearch: no {tsv_path}; run `python driver.py` first")
    rows = read_tsv(tsv_path)
    s = summary(rows, read_night(journal_path, tsv_path))
    if as_json:
        print(json.dumps(s, indent=1))
        return []
    lines = render(s)
    print("\n".join(lines))
    if png_path:
        plot_progress(rows, groups_of(rows), s["sigma"], png_path)
        print(f"wrote {png_path}")
    return lines


def groups_of(rows):
    """val_bpb of the runs of each commit (crashes left out)."""
    groups = {}
    for r in rows:
        if r["status"] != "crash":
            groups.setdefault(r["commit"], []).append(r["val_bpb"])
    return groups


def summary(rows, night):
    """Everything the report says, as data."""
    ideas = idea_rows(rows)
    kept = [r for r in ideas if r["status"] == "keep"]
    baseline = next((r for r in rows if r["description"] == "baseline" and r["status"] == "keep"), None)
    groups = groups_of(rows)
    s = {"experiments": len(ideas), "runs": len(rows), "kept": len(kept),
         "crash_rate": sum(r["status"] == "crash" for r in ideas) / max(len(ideas), 1),
         "sigma": pooled_std(list(groups.values())),
         "wins_rejected": sum("not confirmed" in r["description"] for r in ideas)}
    if baseline:
        chain = [baseline] + kept
        mean = {r["commit"]: statistics.fmean(groups[r["commit"]]) for r in chain}
        s["baseline"] = mean[baseline["commit"]]
        s["best"] = {"val_bpb": mean[chain[-1]["commit"]], "commit": chain[-1]["commit"],
                     "description": chain[-1]["description"]}
        steps = [{"gain": mean[a["commit"]] - mean[b["commit"]], "commit": b["commit"], "description": b["description"]}
                 for a, b in zip(chain, chain[1:])]
        s["improvements"] = sorted(steps, key=lambda x: -x["gain"])
    if night:
        s.update(sandbox=night.sandbox, gpu_hours=night.gpu_s["total"] / 3600, noise_gpu_hours=night.gpu_s["noise"] / 3600,
                 spend=night.spend, since_keep=night.since_keep, themes=night.themes, wall_hours=night.wall_s / 3600)
        s["fits"] = fit_summary(night.finished)
        if night.wall_s:
            s["experiments_per_hour"] = night.experiments_per_hour
            s["duty_cycle"] = night.duty_cycle(sorted(night.slot_seconds))
    return s


def fit_summary(finished):
    """How the runs were fitted to their GPUs: runs per device batch (rows per micro-step), and the
    experiments with a run that ran out of GPU memory and was run again at half its device batch."""
    sizes = {}
    for r in finished:
        if r.get("device_batch"):
            sizes[r["device_batch"]] = sizes.get(r["device_batch"], 0) + 1
    return {"device_batch_runs": dict(sorted(sizes.items(), reverse=True)),
            "rerun_after_oom": sorted({r["n"] for r in finished if r.get("note", "").startswith("out of GPU memory")})}


def render(s):
    """The summary as the report's lines of text."""
    lines = [f"experiments: {s['experiments']} after the baseline ({s['runs']} runs in all), kept "
             f"{s['kept']}, crash rate {s['crash_rate']:.0%}"]
    if "best" in s:
        best = s["best"]
        lines.append(f"val_bpb (mean over seeds): baseline {s['baseline']:.6f} -> best {best['val_bpb']:.6f} "
                     f"({best['val_bpb'] - s['baseline']:+.6f}, {best['commit']}: {best['description']})")
        if s["improvements"]:
            lines.append("top improvements:")
            lines += [f"  -{x['gain']:.6f}  {x['commit']}  {x['description']}" for x in s["improvements"][:5]]
    lines.append("noise floor: " + (f"sigma = {s['sigma']:.6f} val_bpb between seeds of the same code"
                                    if s["sigma"] else "not measured (no code run twice)"))
    lines.append(f"wins rejected as not confirmed: {s['wins_rejected']}")
    if "spend" not in s:
        return lines + ["spend and GPU time: no journal found (runs/<tag>/journal.json)"]
    lines.append(f"sandbox: {s['sandbox'] or 'not recorded (a driver before the sandbox)'}")
    if "experiments_per_hour" in s:
        duty = ", ".join(f"{name} {share:.0%}" for name, share in s["duty_cycle"].items())
        lines.append(f"throughput: {s['experiments_per_hour']:.1f} experiments per hour over {s['wall_hours']:.2f} h; "
                     f"GPU duty cycle (share of wall time inside train.py): {duty or 'no run yet'}")
    fits = s["fits"]
    if fits["device_batch_runs"]:
        lines.append("device batch (rows per micro-step, fitted to the GPU for each run): " + ", ".join(
            f"{rows} in {n} run{'s' * (n > 1)}" for rows, n in fits["device_batch_runs"].items()) + (
            "; run again at half after running out of GPU memory: experiment(s) "
            f"{', '.join(map(str, fits['rerun_after_oom']))}" if fits["rerun_after_oom"] else ""))
    lines.append(f"GPU time: {s['gpu_hours']:.2f} h, of which noise handling {s['noise_gpu_hours']:.2f} h "
                 f"({s['noise_gpu_hours'] / max(s['gpu_hours'], 1e-9):.0%})")
    spend = s["spend"]
    lines.append(f"spend: ${spend['usd']:.2f} ({spend.get('input', 0)} input, {spend.get('output', 0)} output, "
                 f"{spend.get('cache_read', 0)} cache-read, {spend.get('cache_write', 0)} cache-write tokens)")
    lines.append(f"since the last kept change: {s['since_keep']} experiments")
    if s["themes"]:
        lines.append("themes (from the notebook, runs/<tag>/notes.md):")
        for theme, counts in sorted(s["themes"].items(), key=lambda kv: -sum(kv[1].values())):
            lines.append(f"  {theme}: {sum(counts.values())} tried, {counts.get('keep', 0)} kept, "
                         f"{counts.get('discard', 0)} discarded, {counts.get('crash', 0)} crashed")
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
