"""
The report's markdown tables, in the paper's layout (GRAPE, Tables 1-2): one row per positional encoding, the
KV-shift rows after the others, the paper's row order (encodings it does not have follow, by name); one table per
model shape (n_layer, n_embd, n_head, head_dim, block_size). A cell is the mean over a group's runs, "± std" (sample
standard deviation) when the group has more than one; the best mean of each column is bold (highest accuracy,
lowest loss), ties included, when at least two rows have a value.

Tables, each present only when some run has the data:
    zero-shot acc_norm (WinoGrande: acc) and zero-shot acc, %: the 7 tasks in the paper's order (eval/tasks.py) and
        Avg. (per run: the unweighted mean of its columns, as eval/zero_shot.py computes it; then mean ± std)
    loss: the final validation loss (metrics.jsonl) and the extrapolation loss at each evaluated length
        (non-overlapping windows; a second table for sliding windows when present)
"""

import math
import statistics
from dataclasses import dataclass

from eval.tasks import TASKS, at_chance
from eval.zero_shot import scores as zero_shot_scores
from sweeps.results import extrapolation_losses, mean_std

PE_NAMES = {"rope": "RoPE", "grape_m_ctx": "GRAPE-M-ctx", "grape_m": "GRAPE-M-nonctx", "alibi": "ALiBi", "fox": "FoX",
            "grape_a_q": "GRAPE-A-Q", "grape_a_k": "GRAPE-A-K", "grape_a_qk": "GRAPE-A-QK", "grape_ap": "GRAPE-AP",
            "nope": "NoPE", "pope": "PoPE", "rope_id": "RoPE-ID"}
PAPER_ORDER = ["rope", "grape_m_ctx", "grape_m", "alibi", "fox", "grape_a_q", "grape_a_k", "grape_a_qk", "grape_ap"]


def pe_label(config):
    pe = config["pos_encoding"]
    return PE_NAMES.get(pe, pe) + (" (w/ KV-shift)" if config.get("kv_shift") else "")


def _row_order(group):
    pe = group.config["pos_encoding"]
    rank = PAPER_ORDER.index(pe) if pe in PAPER_ORDER else len(PAPER_ORDER)
    return bool(group.config.get("kv_shift")), rank, pe


def labels(groups, with_shape=False):
    """{id(group): label}: the PE label, plus the keys that tell apart groups of one shape (one table) sharing it;
    with_shape (figures, where all shapes meet): the shape too when there are several."""
    out = {}
    several = len({g.shape for g in groups}) > 1
    for g in groups:
        same = [h for h in groups if pe_label(h.config) == pe_label(g.config) and h.shape == g.shape]
        differing = sorted(k for k in g.config if any(h.config.get(k) != g.config[k] for h in same))
        extra = ", ".join(f"{k}={g.config[k]}" for k in differing)
        shape = f", {g.config['n_layer']} x {g.config['n_embd']}" if with_shape and several else ""
        out[id(g)] = pe_label(g.config) + (f" [{extra}]" if extra else "") + shape
    return out


@dataclass(frozen=True)
class Cell:
    """One table cell: the mean over a group's runs, what its "±" shows, and the standard error of the mean that
    decides whether a difference is real (None: unknown, e.g. a loss from a single run)."""
    mean: float | None
    shown: float | None
    se: float | None
    n: int


EMPTY = Cell(None, None, None, 0)


def loss_cell(values):
    """Losses: ± the sample standard deviation over the runs (seeds); standard error std / sqrt(n)."""
    mean, std, n = mean_std(values)
    return Cell(mean, std, std / math.sqrt(n) if std is not None else None, n)


def score_cell(scored):
    """Accuracies with their lm-eval standard errors, [(value, se)] over the runs: ± the standard error of the mean,
    the examples' sampling error (the runs score the same examples, so it does not shrink with n: the mean of the
    runs' errors) combined with the seed spread: sqrt(mean(se_i)^2 + std^2 / n)."""
    scored = [s for s in scored if s is not None]
    mean, std, n = mean_std([v for v, _ in scored])
    if mean is None:
        return EMPTY
    ses = [e for _, e in scored]
    if any(e is None for e in ses):
        return Cell(mean, None, None, n)
    se = math.sqrt(statistics.fmean(ses) ** 2 + (std ** 2 / n if std is not None else 0.0))
    return Cell(mean, se, se, n)


def clearly_best(cells, higher_is_better):
    """The index of the cell better than every other one by more than twice the standard error of the difference,
    sqrt(se_a^2 + se_b^2), or None: a best mean within noise of another (or of unknown noise) is not singled out."""
    got = [(i, c) for i, c in enumerate(cells) if c.mean is not None]
    if len(got) < 2:
        return None
    sign = 1.0 if higher_is_better else -1.0
    i, best = max(got, key=lambda t: sign * t[1].mean)
    for j, other in got:
        if j != i and (best.se is None or other.se is None
                       or sign * (best.mean - other.mean) <= 2.0 * math.hypot(best.se, other.se)):
            return None
    return i


def _format(cell, digits, bold):
    if cell.mean is None:
        return "–"
    text = f"{cell.mean:.{digits}f}" + (f" ± {cell.shown:.{digits}f}" if cell.shown is not None else "")
    return f"**{text}**" if bold else text


def render_table(header, rows, higher_is_better, digits):
    """rows: [(label, [Cell per column], number of runs)] -> markdown lines; per column, the clearly best cell bold."""
    best = [clearly_best([r[1][c] for r in rows], higher_is_better) for c in range(len(header))]
    lines = ["| Method | " + " | ".join(header) + " | n |", "|---" * (len(header) + 2) + "|"]
    for k, (label, cells, n) in enumerate(rows):
        lines.append(f"| {label} | " + " | ".join(_format(cell, digits, best[c] == k) for c, cell in enumerate(cells))
                     + f" | {n} |")
    return lines


def by_shape(groups):
    """[(heading, groups in row order)], one per model shape, in order of first appearance."""
    shapes = {}
    for g in groups:
        shapes.setdefault(g.shape, []).append(g)
    out = []
    for (layers, width, heads, head_dim, context), members in shapes.items():
        heading = f"{layers} layers, width {width}, {heads} heads of {head_dim}, context {context}"
        out.append((heading, sorted(members, key=_row_order)))
    return out


def zero_shot_rows(groups, names, metric):
    """(header, rows, at chance) for the zero-shot table of `metric`, or None when no run of these groups has results.
    at chance: every row is within noise of a uniform guess on every task (eval.tasks.at_chance); a row at chance
    in a table with others that are not is labelled "(at chance)"."""
    records = [r.zero_shot for g in groups for r in g.runs if r.zero_shot]
    if not records:
        return None
    present = [t for t in TASKS if any(t.name in rec["tasks"] for rec in records)]
    header = [t.column + (" (val)" if any(rec["tasks"].get(t.name, {}).get("split", t.split) != t.split
                                          for rec in records) else "") for t in present] + ["Avg."]
    rows, chance = [], []
    for g in groups:
        per_run = [zero_shot_scores(r.zero_shot, metric) for r in g.runs]
        cells = [score_cell([s.get(t.name) for s in per_run]) for t in present]
        cells.append(score_cell([_average(s, present) for s in per_run]))
        scored = {t.name: (c.mean, c.se) for t, c in zip(present, cells) if c.mean is not None}
        chance.append(at_chance(scored))
        rows.append((names[id(g)], cells, len(g.runs)))
    everyone = all(chance)
    rows = [(label + (" (at chance)" if low and not everyone else ""), cells, n)
            for (label, cells, n), low in zip(rows, chance)]
    return header, rows, everyone


def _average(scores, present):
    """(unweighted mean over the tasks shown, its standard error) of one run, or None without scores; the tasks'
    errors are independent: sqrt(sum se^2) / k."""
    got = [scores[t.name] for t in present if t.name in scores]
    if not got:
        return None
    ses = [e for _, e in got]
    se = math.sqrt(sum(e * e for e in ses)) / len(got) if all(e is not None for e in ses) else None
    return statistics.fmean(v for v, _ in got), se


def loss_rows(groups, names, mode):
    """(header, rows, False): final validation loss (nonoverlap table only) and extrapolation loss per length."""
    entries = [r.extrapolation for g in groups for r in g.runs if r.extrapolation]
    lengths = sorted({L for e in entries for L in extrapolation_losses(e, mode)})
    if mode == "sliding" and not lengths:
        return None
    spec = {int(L): v.get("length_spec", "") for e in entries for L, v in e.get(mode, {}).items()}
    header = (["val loss"] if mode == "nonoverlap" else []) + [f"{L} ({spec[L]})" if spec[L] else str(L)
                                                               for L in lengths]
    rows = []
    for g in groups:
        cells = [loss_cell([r.val[-1]["val_loss"] if r.val else None for r in g.runs])] if mode == "nonoverlap" else []
        per_run = [extrapolation_losses(r.extrapolation, mode) for r in g.runs]
        cells += [loss_cell([p.get(L) for p in per_run]) for L in lengths]
        rows.append((names[id(g)], cells, len(g.runs)))
    return header, rows, False


PIPELINE_CHECK = ("pipeline check: every model here is within noise of chance on every task, so this table shows "
                  "that the evaluation runs, not how the encodings compare")


def markdown(groups):
    """Every table for these groups, with headings and notes, then what the numbers show (summary)."""
    names = labels(groups)
    sections = [("Zero-shot, acc_norm (WinoGrande: acc), %", lambda gs: zero_shot_rows(gs, names, "acc_norm"), True, 2),
                ("Zero-shot, acc, %", lambda gs: zero_shot_rows(gs, names, "acc"), True, 2),
                ("Loss: validation, and by evaluation length (non-overlapping windows)",
                 lambda gs: loss_rows(gs, names, "nonoverlap"), False, 4),
                ("Loss by evaluation length (sliding windows)", lambda gs: loss_rows(gs, names, "sliding"), False, 4)]
    lines = []
    for title, make, higher, digits in sections:
        parts = [(heading, made) for heading, gs in by_shape(groups) if (made := make(gs)) is not None]
        if not parts:
            continue
        lines += [f"## {title}", ""]
        for heading, (header, rows, at_chance) in parts:
            lines += [f"### {heading}" + (f" ({PIPELINE_CHECK})" if at_chance else ""), "",
                      *render_table(header, rows, higher, digits), ""]
    has_zero_shot = any(r.zero_shot for g in groups for r in g.runs)
    notes = ["losses: mean ± sample standard deviation over the n runs of a row (seeds)"]
    if has_zero_shot:
        notes.append("zero-shot: mean ± its standard error (lm-eval's, from the number of examples, combined with "
                     "the seed spread when n > 1)")
    notes.append("bold: a cell better than every other of its column by more than twice the standard error of the "
                 "difference (for losses std / sqrt(n), so single runs are never bold); none where the best is "
                 "within noise")
    limits = sorted({r.zero_shot.get("limit") for g in groups for r in g.runs if r.zero_shot} - {None})
    if limits:
        notes.append(f"zero-shot on the first {', '.join(map(str, limits))} examples per task (--limit), not the "
                     f"full splits")
    lines += [f"Notes: {'; '.join(notes)}.", ""]
    found = summary(groups, names)
    if found:
        lines += ["## What the numbers show", "", *found, ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------ summary


def _signed(x, digits=3):
    """+0.104, \u22120.009 (a minus sign, not a hyphen); a value that rounds to zero is +0.000."""
    return f"{round(x, digits) + 0.0:+.{digits}f}".replace("-", "\u2212")


def _names_and(items):
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def summary(groups, names):
    """What the extrapolation results show, in words, per model shape: from the training length T to the longest
    length every run was evaluated at, whose loss rises, falls or changes within noise (per-run change, then mean ±
    seed std; rises / falls: by more than twice its standard error), and which is lowest at T and whether by more
    than the noise. [] when no run has a loss at T and beyond."""
    out = []
    shapes = by_shape(groups)
    for heading, gs in shapes:
        T = gs[0].config["block_size"]
        per_run = {id(g): [extrapolation_losses(r.extrapolation, "nonoverlap") for r in g.runs if r.extrapolation]
                   for g in gs}
        usable = [g for g in gs if per_run[id(g)] and all(T in e for e in per_run[id(g)])]
        longest = [max(L for e in per_run[id(g)] for L in e) for g in usable]
        common = [L for L in (min(longest, default=T),)
                  if L > T and all(L in e for g in usable for e in per_run[id(g)])]
        if not common:
            continue
        L = common[0]
        change = {id(g): loss_cell([e[L] - e[T] for e in per_run[id(g)]]) for g in usable}
        at_T = {id(g): loss_cell([e[T] for e in per_run[id(g)]]) for g in usable}
        fmt = lambda g: f"{names[id(g)]} ({_signed(change[id(g)].mean)}" + (
            f" ± {change[id(g)].shown:.3f})" if change[id(g)].shown is not None else ")")
        prefix = f"{heading}: " if len(shapes) > 1 else ""
        multiple = f"{L // T}x" if L % T == 0 else f"{L} tokens"
        if any(change[id(g)].se is None for g in usable):
            out.append(f"{prefix}From the training length ({T} tokens) to {multiple} ({L}) the loss changes by "
                       f"{', '.join(fmt(g) for g in usable)}; with one run per row there is no seed spread, so "
                       f"differences this small cannot be told from noise (train more seeds).")
            continue
        kinds = {"rises": [], "falls": [], "changes within noise": []}
        for g in usable:
            c = change[id(g)]
            kinds["rises" if c.mean - 2 * c.se > 0 else "falls" if c.mean + 2 * c.se < 0
                  else "changes within noise"].append(fmt(g))
        clauses = [f"{kind} for {_names_and(items)}" for kind, items in kinds.items() if items]
        n = sorted({c.n for c in change.values()})
        text = (f"{prefix}From the training length ({T} tokens) to {multiple} ({L}) the loss "
                f"{_names_and(clauses)} (change per run, mean ± std over {'/'.join(map(str, n))} seeds; rises or "
                f"falls: by more than twice its standard error).")
        cells = [at_T[id(g)] for g in usable]
        best = clearly_best(cells, higher_is_better=False)
        lowest = min(usable, key=lambda g: at_T[id(g)].mean)
        level = lambda g: f"{names[id(g)]} ({at_T[id(g)].mean:.3f} ± {at_T[id(g)].shown:.3f})"
        if best is not None:
            text += f" At the training length {level(lowest)} is lowest, by more than the seed noise."
        else:
            close = [g for g in usable
                     if g is not lowest and clearly_best([at_T[id(lowest)], at_T[id(g)]], False) is None]
            text += (f" At the training length the lowest loss, {level(lowest)}, is within seed noise of "
                     f"{_names_and([level(g) for g in close])}.")
        out.append(text)
    return out
