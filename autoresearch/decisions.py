"""Deciding: keep, discard or run again, as pure functions of the measured values.

The spread of val_bpb between seeds of the same code (the noise floor, sigma) is pooled
over every code run more than once. A candidate must beat the best by the margin

    CONFIRM_K * sigma * sqrt(1/n_candidate + 1/n_best)

(the difference of two means of n independent runs has standard deviation
sigma*sqrt(1/n1 + 1/n2), so K = 2 lets a no-better change through about 2% of the time).
Clearly better on one run: kept at once. Better, but by less than the margin: re-run on
fresh seeds (and the best too, while it has fewer runs) and kept only if the mean still
beats the best's mean by the margin; else "not confirmed".
"""

import math
import statistics

CONFIRM_RUNS = 3                   # most runs of a marginal candidate, its first run included
CONFIRM_K = 2.0                    # margin = K * sigma * sqrt(1/n1 + 1/n2)
CONFIRM_MIN_K = 0.5                # a first run must beat the best by this many sigmas to earn repeats
NOISE_BUDGET_FRACTION = 0.2        # share of all runs that noise runs and repeats may take ...
NOISE_BUDGET_GRACE_RUNS = 5        # ... plus this many (the start-up noise runs, early confirmations)


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
    best_short = len(best_vals) < min(n, CONFIRM_RUNS - 1)  # (runs carried over a re-base can outnumber the best's)
    if cand >= best or n >= CONFIRM_RUNS and not best_short:
        return "discard", note
    if no_repeat:
        return "discard", f"{note} ({no_repeat})"
    return ("repeat_best" if best_short or len(best_vals) < n else "repeat"), note


def budget_allows(run_counts):
    """Another repeat fits in NOISE_BUDGET_FRACTION of all runs (plus a small grace). Runs
    share one time budget, so counting runs counts GPU time without timing jitter."""
    return run_counts["noise"] + 1 <= NOISE_BUDGET_FRACTION * (run_counts["total"] + 1) \
        + NOISE_BUDGET_GRACE_RUNS
