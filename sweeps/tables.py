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

from eval.tasks import TASKS
from sweeps.results import extrapolation_losses, mean_std, zero_shot_scores

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


def _cell(stat, digits, bold):
    mean, std, _ = stat
    if mean is None:
        return "–"
    text = f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")
    return f"**{text}**" if bold else text


def render_table(header, rows, higher_is_better, digits):
    """rows: [(label, [(mean, std, n) per column], number of runs)] -> markdown lines."""
    best = []
    for c in range(len(header)):
        means = [r[1][c][0] for r in rows if r[1][c][0] is not None]
        best.append((max if higher_is_better else min)(means) if len(means) > 1 else None)
    lines = ["| Method | " + " | ".join(header) + " | n |", "|---" * (len(header) + 2) + "|"]
    for label, stats, n in rows:
        cells = [_cell(s, digits, best[c] is not None and s[0] == best[c]) for c, s in enumerate(stats)]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {n} |")
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
    """(header, rows) for the zero-shot table of `metric`, or None when no run of these groups has results."""
    records = [r.zero_shot for g in groups for r in g.runs if r.zero_shot]
    if not records:
        return None
    present = [t for t in TASKS if any(t.name in rec["tasks"] for rec in records)]
    header = [t.column + (" (val)" if any(rec["tasks"].get(t.name, {}).get("split", t.split) != t.split
                                          for rec in records) else "") for t in present] + ["Avg."]
    rows = []
    for g in groups:
        per_run = [zero_shot_scores(r.zero_shot, metric) for r in g.runs]
        stats = [mean_std([s.get(t.name) for s in per_run]) for t in present]
        avgs = [sum(v) / len(v) if (v := [s[t.name] for t in present if t.name in s]) else None for s in per_run]
        rows.append((names[id(g)], stats + [mean_std(avgs)], len(g.runs)))
    return header, rows


def loss_rows(groups, names, mode):
    """(header, rows): final validation loss (nonoverlap table only) and extrapolation loss per length."""
    entries = [r.extrapolation for g in groups for r in g.runs if r.extrapolation]
    lengths = sorted({L for e in entries for L in extrapolation_losses(e, mode)})
    if mode == "sliding" and not lengths:
        return None
    spec = {int(L): v.get("length_spec", "") for e in entries for L, v in e.get(mode, {}).items()}
    header = (["val loss"] if mode == "nonoverlap" else []) + [f"{L} ({spec[L]})" if spec[L] else str(L)
                                                               for L in lengths]
    rows = []
    for g in groups:
        stats = [mean_std([r.val[-1]["val_loss"] if r.val else None for r in g.runs])] if mode == "nonoverlap" else []
        per_run = [extrapolation_losses(r.extrapolation, mode) for r in g.runs]
        stats += [mean_std([p.get(L) for p in per_run]) for L in lengths]
        rows.append((names[id(g)], stats, len(g.runs)))
    return header, rows


def markdown(groups):
    """Every table for these groups, with headings and notes."""
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
        for heading, (header, rows) in parts:
            lines += [f"### {heading}", "", *render_table(header, rows, higher, digits), ""]
    limits = sorted({r.zero_shot.get("limit") for g in groups for r in g.runs if r.zero_shot} - {None})
    notes = ["cells: mean ± sample standard deviation over the n runs of a row (seeds)",
             "bold: the best mean of each column (highest accuracy, lowest loss)"]
    if limits:
        notes.append(f"zero-shot on the first {', '.join(map(str, limits))} examples per task (--limit), not the "
                     f"full splits")
    return "\n".join(lines + [f"Notes: {'; '.join(notes)}.", ""])
