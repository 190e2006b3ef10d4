"""scripts/report.py on synthetic run directories: grouping over seeds, exact mean ± std (losses) and mean ± standard
error (zero-shot), bold only for a difference larger than its noise, chance-level tables labelled as pipeline
checks, the summary's sentences, files, no overwrite, and the per-run table it always printed."""

import json
import math
import statistics
from pathlib import Path

import pytest

from config import load_config
from eval.tasks import TASKS_BY_NAME

REPO = Path(__file__).resolve().parents[1]
TASKS = ["arc_easy", "arc_challenge", "hellaswag", "openbookqa", "piqa", "winogrande", "sciq"]


def report_main(*argv):
    from scripts import report

    return report.main([str(a) for a in argv])


def make_run(root, name, pe, seed, kv_shift=False, acc_norm=None, val_loss=5.0, extrapolation=None, steps=10,
             extra=(), n_examples=100, stderr=None):
    """A run directory as train.py and the evaluations leave it: config.json, metrics.jsonl, eval/*.json."""
    run = root / name
    (run / "eval").mkdir(parents=True)
    cfg = load_config(REPO / "configs" / "tiny" / "base.toml",
                      [f"--pos_encoding={pe}", f"--kv_shift={kv_shift}", f"--seed={seed}", f"--data_seed={seed}",
                       f"--out_dir={run}", f"--max_steps={steps}", *extra]).resolved_dict()
    (run / "config.json").write_text(json.dumps(cfg))
    events = [dict(event="start", step=0)]
    for step in range(1, steps + 1):
        events.append(dict(event="train", step=step, tokens=step * 4096, loss=10.0 - step * 0.1 - seed * 0.01))
    events.append(dict(event="val", step=steps, tokens=steps * 4096, val_loss=val_loss))
    (run / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    ckpt = run / f"ckpt_{steps:07d}"
    if acc_norm is not None:
        tasks = {t: dict(acc=v - 1.0, acc_norm=v, split=TASKS_BY_NAME[t].split, n=n_examples)
                 for t, v in zip(TASKS, acc_norm)}
        tasks["winogrande"] = dict(acc=acc_norm[5], split="validation", n=n_examples)
        if stderr is not None:  # as eval/zero_shot.py stores lm-eval's; without it the binomial one is used
            for entry in tasks.values():
                entry.update({f"{m}_stderr": stderr for m in ("acc", "acc_norm") if m in entry})
        tasks["sciq"]["split"] = "validation"  # offline SciQ: labelled "(val)"
        (run / "eval" / f"{ckpt.name}_zero_shot_20260101-000000.json").write_text(json.dumps(dict(
            checkpoint=str(ckpt), step=steps, pos_encoding=pe, kv_shift=kv_shift, limit=None, tasks=tasks,
            time_utc="2026-01-01T00:00:00Z")))
    if extrapolation is not None:
        entry = dict(path=str(ckpt), step=steps, pos_encoding=pe, kv_shift=kv_shift, block_size=256, overrides={},
                     nonoverlap={str(L): dict(length_spec=f"{L // 256}x", loss=v) for L, v in extrapolation.items()},
                     sliding={})
        scaled = dict(entry, overrides={"rope_scaling": "yarn"}, nonoverlap={L: dict(v, loss=0.0) for L, v in
                                                                            entry["nonoverlap"].items()})
        (run / "eval" / "extrapolation_20260101-000000.json").write_text(json.dumps(dict(
            lengths=[f"{L // 256}x" for L in extrapolation], time_utc="2026-01-01T00:00:00Z",
            checkpoints=[scaled, entry])))  # the scaled variant (--rope-scaling) is not the run's own result
    return run


@pytest.fixture
def runs(tmp_path):
    scores = {  # per run: the 7 tasks' acc_norm (WinoGrande: acc)
        ("rope", 0): [30, 20, 25, 30, 60, 50, 70], ("rope", 1): [34, 22, 25, 28, 62, 52, 74],
        ("alibi", 0): [40, 21, 26, 29, 61, 51, 72], ("alibi", 1): [38, 23, 27, 27, 63, 49, 76],
        ("grape_ap", 0): [35, 26, 24, 31, 59, 53, 73],
    }
    val = {("rope", 0): 5.0, ("rope", 1): 5.2, ("alibi", 0): 4.9, ("alibi", 1): 4.95, ("grape_ap", 0): 5.1}
    ext = {("rope", 0): {256: 5.0, 512: 6.0}, ("rope", 1): {256: 5.2, 512: 6.4},
           ("alibi", 0): {256: 4.9, 512: 5.0}, ("alibi", 1): {256: 5.1, 512: 5.2}, ("grape_ap", 0): {256: 5.0,
                                                                                                      512: 5.3}}
    dirs = [make_run(tmp_path, f"tiny_{pe}_s{seed}", pe, seed, acc_norm=scores[pe, seed], val_loss=val[pe, seed],
                     extrapolation=ext[pe, seed]) for pe, seed in scores]
    dirs.append(make_run(tmp_path, "tiny_rope_kvshift_s0", "rope", 0, kv_shift=True, val_loss=4.8))
    return dirs, scores


def table(text, title):
    """The markdown lines of the first table under the heading that starts with `title`."""
    lines = text[text.index(f"## {title}"):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| Method"))
    end = next(i for i in range(start, len(lines)) if not lines[i].startswith("|"))
    return lines[start:end]


def row(lines, label):
    return [c.strip() for c in next(line for line in lines if line.startswith(f"| {label} |")).split("|")[2:-1]]


def binomial_se(percent, n=100):
    p = percent / 100
    return 100 * math.sqrt(p * (1 - p) / (n - 1))


def test_groups_over_seeds_with_exact_mean_and_noise(runs, capsys):
    dirs, scores = runs
    assert report_main(*dirs) == 0
    text = capsys.readouterr().out
    zs = table(text, "Zero-shot, acc_norm")
    assert zs[0] == ("| Method | ARC-E | ARC-C | HellaSwag | OBQA | PIQA | WinoGrande | SciQ (val) | Avg. | n |")
    labels = [line.split("|")[1].strip() for line in zs[2:]]
    assert labels == ["RoPE", "ALiBi", "GRAPE-AP", "RoPE (w/ KV-shift)"]  # the paper's order, KV-shift last
    rope, ap = row(zs, "RoPE"), row(zs, "GRAPE-AP")
    # two seeds: the examples' sampling error (mean of the runs' binomial errors) with the seed spread of 30, 34
    se = math.sqrt(statistics.fmean([binomial_se(30), binomial_se(34)]) ** 2 + statistics.variance([30, 34]) / 2)
    assert rope[0] == f"32.00 ± {se:.2f}" and rope[-1] == "2"
    assert ap[1] == f"26.00 ± {binomial_se(26):.2f}" and ap[-1] == "1"  # one run: its own standard error
    avgs = [statistics.fmean(scores["rope", s]) for s in (0, 1)]
    avg_ses = [math.sqrt(sum(binomial_se(v) ** 2 for v in scores["rope", s])) / 7 for s in (0, 1)]
    avg_se = math.sqrt(statistics.fmean(avg_ses) ** 2 + statistics.variance(avgs) / 2)
    assert rope[7] == f"{statistics.fmean(avgs):.2f} ± {avg_se:.2f}"
    assert row(zs, "RoPE (w/ KV-shift)")[0] == "–"  # no zero-shot results for that run
    assert "**" not in "\n".join(zs)  # 100 examples per task: every difference here is within noise
    acc = table(text, "Zero-shot, acc,")
    assert row(acc, "RoPE")[0].startswith("31.00 ± ") and row(acc, "RoPE")[5].startswith("51.00 ± ")  # WinoGrande: acc
    loss = table(text, "Loss: validation")
    assert loss[0] == "| Method | val loss | 256 (1x) | 512 (2x) | n |"
    assert row(loss, "RoPE (w/ KV-shift)")[0] == "4.8000"  # lowest, but a single run has no noise estimate
    assert row(loss, "RoPE")[1:3] == [f"5.1000 ± {statistics.stdev([5.0, 5.2]):.4f}",
                                      f"6.2000 ± {statistics.stdev([6.0, 6.4]):.4f}"]
    # ALiBi's 512 (5.1 ± 0.14) against RoPE's (6.2 ± 0.28): 1.1 > 2 * hypot(0.1, 0.2) = 0.45, so bold; GRAPE-AP's
    # single run has no noise estimate, and a row of unknown noise is never out-run by more than its noise
    assert row(loss, "ALiBi")[2] == f"5.1000 ± {statistics.stdev([5.0, 5.2]):.4f}"
    assert "Loss by evaluation length (sliding" not in text  # no sliding results, no table
    # the per-run table printed before these tables is unchanged
    assert "| run | positional encoding | steps | tokens | train loss | val loss |" in text
    assert "| tiny_rope_s1 | rope | 10 | 40,960 | 8.9900 | 5.2000 |" in text


def loss_table(tmp_path, capsys, per_pe):
    """The loss table of runs whose validation losses are given per PE, one run per value (seeds 0, 1, ...)."""
    dirs = [make_run(tmp_path, f"tiny_{pe}_s{seed}", pe, seed, val_loss=v) for pe, values in per_pe.items()
            for seed, v in enumerate(values)]
    assert report_main(*dirs) == 0
    return table(capsys.readouterr().out, "Loss: validation")


@pytest.mark.parametrize("gap, bold", [(0.15, True), (0.13, False)])
def test_bold_only_beyond_twice_the_standard_error_of_the_difference(tmp_path, capsys, gap, bold):
    """Two seeds each, std 0.0707 (se 0.05): the difference of two means has se 0.0707, so a gap of 0.15 (> 0.1414)
    is bold and one of 0.13 is not."""
    lines = loss_table(tmp_path, capsys, {"alibi": [1.0, 1.1], "rope": [1.0 + gap, 1.1 + gap]})
    assert row(lines, "ALiBi")[0] == ("**1.0500 ± 0.0707**" if bold else "1.0500 ± 0.0707")
    assert "**" not in row(lines, "RoPE")[0]


def test_single_runs_and_ties_are_never_bold(tmp_path, capsys):
    lines = loss_table(tmp_path, capsys, {"alibi": [1.0], "rope": [3.0]})
    assert row(lines, "ALiBi")[0] == "1.0000" and row(lines, "RoPE")[0] == "3.0000"
    lines = loss_table(tmp_path / "tie", capsys, {"alibi": [1.0, 1.1], "rope": [1.0, 1.1], "fox": [2.0, 2.1]})
    assert "**" not in "\n".join(lines)


def test_zero_shot_at_chance_is_a_pipeline_check(tmp_path, capsys):
    """Chance: 25% on the 4-way tasks, 50% on PIQA and WinoGrande. Every row within two standard errors of it on
    every task: the table is headed as a pipeline check. One row clearly above it on some task: only the rows at
    chance are labelled."""
    near_chance = [27, 24, 25, 26, 51, 49, 23]
    runs = [make_run(tmp_path, "tiny_rope_s0", "rope", 0, acc_norm=near_chance, n_examples=40),
            make_run(tmp_path, "tiny_alibi_s0", "alibi", 0, acc_norm=[26, 25, 24, 25, 50, 52, 28], n_examples=40)]
    assert report_main(*runs) == 0
    text = capsys.readouterr().out
    assert "### 4 layers, width 128, 4 heads of 32, context 256 (pipeline check: every model here is within noise " \
           "of chance" in text
    assert "(at chance)" not in text
    learned = make_run(tmp_path, "tiny_fox_s0", "fox", 0, acc_norm=[60, 24, 25, 26, 51, 49, 23], n_examples=1000)
    assert report_main(*runs, learned) == 0
    zs = table(capsys.readouterr().out, "Zero-shot, acc_norm")
    assert [line.split("|")[1].strip() for line in zs[2:]] == ["RoPE (at chance)", "ALiBi (at chance)", "FoX"]


def test_summary_says_which_loss_rises_beyond_the_training_length(tmp_path, capsys):
    ext = {("rope", 0): {256: 2.0, 512: 2.3}, ("rope", 1): {256: 2.1, 512: 2.5},      # +0.30, +0.40: rises
           ("alibi", 0): {256: 2.2, 512: 2.19}, ("alibi", 1): {256: 2.3, 512: 2.288},  # -0.010, -0.012: falls
           ("fox", 0): {256: 2.0, 512: 2.05}, ("fox", 1): {256: 2.1, 512: 2.05}}      # +0.05, -0.05: noise
    dirs = [make_run(tmp_path, f"tiny_{pe}_s{seed}", pe, seed, extrapolation=e) for (pe, seed), e in ext.items()]
    assert report_main(*dirs) == 0
    text = capsys.readouterr().out
    found = text[text.index("## What the numbers show"):]
    assert ("From the training length (256 tokens) to 2x (512) the loss rises for RoPE (+0.350 ± 0.071), falls for "
            "ALiBi (\u22120.011 ± 0.001) and changes within noise for FoX (+0.000 ± 0.071)") in found
    assert "At the training length the lowest loss, RoPE (2.050 ± 0.071), is within seed noise of FoX (2.050" in found
    single = make_run(tmp_path / "one", "tiny_rope_s0", "rope", 0, extrapolation={256: 2.0, 512: 2.3})
    assert report_main(single) == 0
    assert "with one run per row there is no seed spread" in capsys.readouterr().out


def test_out_writes_markdown_and_figures_and_never_overwrites(runs, tmp_path, capsys):
    dirs, _ = runs
    out = tmp_path / "report"
    assert report_main(*dirs, "--out", out) == 0
    first = sorted(out.iterdir())
    md = next(p for p in first if p.suffix == ".md")
    stem = md.name[:-3]
    assert stem.startswith("report_")
    assert {p.name for p in first} == {f"{stem}.md", f"{stem}_loss.png", f"{stem}_extrapolation.png"}
    for png in (p for p in first if p.suffix == ".png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert md.read_text() in capsys.readouterr().out
    saved = {p: p.read_bytes() for p in first}
    assert report_main(*dirs, "--out", out) == 0  # same second: a new name, not the old one
    after = sorted(out.iterdir())
    assert len(after) == 6 and all(p.read_bytes() == b for p, b in saved.items())


def test_no_extrapolation_no_figure_and_resumed_metrics_keep_the_last_record(tmp_path, capsys):
    run = make_run(tmp_path, "r", "rope", 0, val_loss=6.0)
    with open(run / "metrics.jsonl", "a") as f:  # a resumed attempt logs step 10 again
        f.write(json.dumps(dict(event="train", step=10, tokens=40960, loss=1.25)) + "\n")
    assert report_main(run, "--out", tmp_path / "out") == 0
    assert "| r | rope | 10 | 40,960 | 1.2500 | 6.0000 |" in capsys.readouterr().out
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert len(written) == 2 and written[0].endswith(".md") and written[1].endswith("_loss.png")


def test_each_model_shape_gets_its_own_table(tmp_path, capsys):
    small = make_run(tmp_path, "small", "rope", 0, val_loss=6.0, extra=["--n_layer=2"])
    large = make_run(tmp_path, "large", "rope", 0, val_loss=5.0)
    assert report_main(small, large) == 0
    text = capsys.readouterr().out
    loss = text[text.index("## Loss: validation"):]
    assert loss.count("### ") == 2 and "### 2 layers, width 128, 4 heads of 32, context 256" in loss
    assert loss.count("| RoPE | 6.0000 | 1 |") == 1 and loss.count("| RoPE | 5.0000 | 1 |") == 1  # no bold, no suffix


def test_not_a_run_directory_is_an_error(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    assert report_main(tmp_path / "x") == 2
    assert "is not a train.py run directory: config.json is missing" in capsys.readouterr().err


def test_unfinished_runs_are_listed_but_not_averaged(tmp_path, capsys):
    """A run still training (its last step below max_steps) is in the per-run table and named as unfinished, but a
    mean over runs at different steps would compare nothing: it stays out of the aggregated rows."""
    done = make_run(tmp_path, "tiny_rope_s0", "rope", 0, val_loss=5.0)
    running = make_run(tmp_path, "tiny_rope_s1", "rope", 1, val_loss=9.0, steps=4, extra=["--max_steps=10"])
    assert report_main(done, running) == 0
    out = capsys.readouterr().out
    assert "| tiny_rope_s1 | rope | 4 |" in out and "Not finished, so not in the tables below: tiny_rope_s1." in out
    assert "| RoPE | 5.0000 | 1 |" in out and "9.0000" not in out.split("Not finished")[1]


def test_plot_styles_pair_a_pe_with_its_kv_shift_variant_and_never_repeat_a_colour():
    from types import SimpleNamespace

    from sweeps.plots import _line_styles

    pes = ["rope", "alibi", "fox", "grape_m", "grape_m_ctx", "grape_a_qk", "grape_ap", "pope", "rope_id", "nope",
           "grape_m_basis"]
    groups = [SimpleNamespace(config={"pos_encoding": pe, "kv_shift": False}) for pe in pes]
    groups += [SimpleNamespace(config={"pos_encoding": pe, "kv_shift": True}) for pe in ("rope", "fox")]
    styles = _line_styles(groups)
    base = {g.config["pos_encoding"]: styles[id(g)] for g in groups if not g.config["kv_shift"]}
    assert len({s["color"] for s in base.values()}) == len(pes)       # 11 PEs: 11 colours
    for g in groups[len(pes):]:
        assert styles[id(g)]["color"] == base[g.config["pos_encoding"]]["color"]
        assert styles[id(g)]["ls"] == "--" and base[g.config["pos_encoding"]]["ls"] == "-"
