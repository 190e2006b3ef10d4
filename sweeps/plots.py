"""
The report's figures (matplotlib, Agg), one line per group (a PE, KV-shift and shape; mean over its runs):

    loss curves     left: training loss vs tokens, right: validation loss vs tokens (metrics.jsonl). A group's
                    curve is the mean over its runs at the steps every run logged.
    extrapolation   left: mean loss vs evaluation length (log scale), non-overlapping windows; right: the change
                    from the training length (each run minus its own loss there, then the mean), where seed offsets
                    cancel; error bars = sample std over the group's runs; the training length dotted.

A line's colour names its PE and a dashed line marks KV-shift, so a PE and its KV-shift variant read as a pair and no
two PEs share a colour (tab20 holds 20; matplotlib's default cycle repeats after 10).
"""

import numpy as np

from sweeps.results import extrapolation_losses


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _line_styles(groups):
    """{id(group): matplotlib kwargs}: one colour per distinct pos_encoding in order of appearance, dashed if kv_shift.

    Up to 10 PEs take tab20's saturated half (tab10's colours); more take all 20 (pale ones included)."""
    palette = _pyplot().get_cmap("tab20").colors
    pes = list(dict.fromkeys(g.config["pos_encoding"] for g in groups))
    step = 2 if len(pes) <= 10 else 1
    return {id(g): {"color": palette[(step * pes.index(g.config["pos_encoding"])) % 20],
                    "ls": "--" if g.config.get("kv_shift") else "-"} for g in groups}


def _mean_curve(runs, events, key):
    """(tokens, mean values) over the steps that every run logged."""
    per_run = [{r["step"]: r for r in getattr(run, events)} for run in runs]
    steps = sorted(set.intersection(*(set(p) for p in per_run))) if per_run else []
    tokens = [per_run[0][s]["tokens"] for s in steps]
    return tokens, [float(np.mean([p[s][key] for p in per_run])) for s in steps]


def loss_curves(groups, names, path):
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    styles = _line_styles(groups)
    for ax, events, key, title in ((axes[0], "train", "loss", "training loss"),
                                   (axes[1], "val", "val_loss", "validation loss")):
        for g in groups:
            tokens, values = _mean_curve(g.runs, events, key)
            if tokens:
                ax.plot(tokens, values, marker="o" if events == "val" else None, ms=3, lw=1.2, label=names[id(g)],
                        **styles[id(g)])
        ax.set(xlabel="tokens", ylabel="loss (nats)", title=f"{title} (mean over seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def extrapolation(groups, names, path):
    """The figure, or False (nothing written) when no run has extrapolation results. Left: mean loss vs length.
    Right: each run's loss minus its own loss at the training length, then mean ± std over the group's runs: the
    seed-to-seed offsets of the whole curve cancel, so what remains is how the loss changes with length."""
    if not any(r.extrapolation for g in groups for r in g.runs):
        return False
    plt = _pyplot()
    fig, (ax, ax_change) = plt.subplots(1, 2, figsize=(14, 4.8))
    styles = _line_styles(groups)
    for g in groups:
        per_run = [extrapolation_losses(r.extrapolation, "nonoverlap") for r in g.runs if r.extrapolation]
        lengths = sorted(set.intersection(*(set(p) for p in per_run))) if per_run else []
        if not lengths:
            continue
        values = np.array([[p[L] for L in lengths] for p in per_run])
        spread = lambda v: v.std(axis=0, ddof=1) if len(v) > 1 else None
        ax.errorbar(lengths, values.mean(axis=0), yerr=spread(values), marker="o", ms=4, capsize=3, lw=1.2,
                    label=names[id(g)], **styles[id(g)])
        T = g.config["block_size"]
        if T in lengths:
            change = values - values[:, [lengths.index(T)]]
            ax_change.errorbar(lengths, change.mean(axis=0), yerr=spread(change), marker="o", ms=4, capsize=3,
                               lw=1.2, label=names[id(g)], **styles[id(g)])
    for a in (ax, ax_change):
        for T in sorted({g.config["block_size"] for g in groups}):
            a.axvline(T, color="gray", ls=":", lw=0.8)
        a.set_xscale("log", base=2)
        a.set_xlabel("evaluation length (tokens)")
        a.grid(alpha=0.3)
    ax_change.axhline(0.0, color="gray", lw=0.8)
    ax.set(ylabel="mean loss (nats)", title="loss vs evaluation length (non-overlapping windows)")
    ax_change.set(ylabel="change from the training length (nats)",
                  title="per run, minus its loss at the training length (dotted)")
    ax_change.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle("error bars: sample std over seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
