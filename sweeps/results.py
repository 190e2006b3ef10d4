"""
Results of train.py runs, read from their directories (nothing is recomputed):

    config.json                  the resolved config (train.py)
    metrics.jsonl                {"event": "train", step, tokens, loss, ...}, {"event": "val", step, tokens, val_loss}
    eval/*_zero_shot_*.json      eval/zero_shot.py: step, limit, tasks {task: {acc, acc_norm, split, n, ...}}
    eval/extrapolation_*.json    eval/extrapolation.py: lengths, checkpoints [{path, step, block_size,
                                 nonoverlap {L: {loss, length_spec, ...}}, sliding {L: {...}}}]

A resumed train.py moves the records of the steps it re-runs to metrics_discarded.jsonl; should a step still appear
twice (a directory written before train.py did that), its last record is the one kept, the attempt that went on.
A run's zero-shot and extrapolation results are the newest outputs for its highest evaluated step (for
extrapolation, the entry without evaluation-time overrides when there is one).

Groups: runs that differ only in seed and data_seed, and in keys that do not change what is computed
(config.RESUMABLE_CHANGES other than max_steps, lr_decay_steps, data_dir and val_tokens), form one group; tables
report a group's mean and sample standard deviation (n - 1 in the denominator) over its runs.
"""

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from config import RESUMABLE_CHANGES, build_config, read_json_file, read_metrics_file, total_steps

NOT_GROUPED_BY = {"seed", "data_seed"} | (RESUMABLE_CHANGES - {"max_steps", "lr_decay_steps", "data_dir",
                                                               "val_tokens"})
SHAPE_KEYS = ("n_layer", "n_embd", "n_head", "head_dim", "block_size")


@dataclass
class RunResult:
    path: Path
    config: dict
    train: list  # "train" events, one per step, in step order
    val: list  # "val" events
    zero_shot: dict | None = None  # the eval/zero_shot.py record
    extrapolation: dict | None = None  # this run's entry of an eval/extrapolation.py result

    @property
    def name(self):
        return self.path.name

    @property
    def finished(self):
        """Trained to its last step: config.total_steps of its config, the test train.py itself applies."""
        total = total_steps(build_config(self.config, where=str(self.path / "config.json")))
        return bool(self.train) and self.train[-1]["step"] >= total


def _events(metrics_file):
    """(train events, val events) of a metrics.jsonl, each step once (its last record); a torn last line, left by
    a crash or a full disk, is dropped with a warning (config.read_metrics_file)."""
    last = {}
    for record in read_metrics_file(metrics_file)[0]:
        if record.get("event") in ("train", "val"):
            last[(record["event"], record["step"])] = record
    by_step = sorted(last.items(), key=lambda kv: kv[0][1])
    return [r for (e, _), r in by_step if e == "train"], [r for (e, _), r in by_step if e == "val"]


def last_val_loss(run_dir):
    metrics_file = Path(run_dir) / "metrics.jsonl"
    if not metrics_file.is_file():
        return None
    _, val = _events(metrics_file)
    return val[-1]["val_loss"] if val else None


def _records(directory, pattern):
    for path in sorted(Path(directory).glob(pattern)):
        try:
            yield json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue  # an evaluation that is still running, or was killed


def _newest_zero_shot(run_dir):
    found = list(_records(run_dir / "eval", "*_zero_shot_*.json"))
    return max(found, key=lambda r: (r.get("step") or -1, r.get("time_utc", ""))) if found else None


def _newest_extrapolation(run_dir):
    mine = []
    for rec in _records(run_dir / "eval", "extrapolation_*.json"):
        for entry in rec.get("checkpoints", []):
            if Path(entry["path"]).resolve().parent == run_dir.resolve():
                # the model as trained before evaluation-time variants of it (--override, --rope-scaling)
                mine.append((not entry.get("overrides"), entry.get("step") or -1, rec.get("time_utc", ""), entry))
    return max(mine, key=lambda t: t[:3])[3] if mine else None


def read_run(run_dir):
    run_dir = Path(run_dir)
    config_file, metrics_file = run_dir / "config.json", run_dir / "metrics.jsonl"
    for f in (config_file, metrics_file):
        if not f.is_file():
            raise FileNotFoundError(f"{run_dir} is not a train.py run directory: {f.name} is missing")
    train, val = _events(metrics_file)
    return RunResult(path=run_dir, config=read_json_file(config_file, "the run's config"), train=train, val=val,
                     zero_shot=_newest_zero_shot(run_dir), extrapolation=_newest_extrapolation(run_dir))


# ------------------------------------------------------------------------------------------------------------ groups


@dataclass
class Group:
    key: tuple  # the config without the keys in NOT_GROUPED_BY
    runs: list = field(default_factory=list)

    @property
    def config(self):
        return dict(self.key)

    @property
    def shape(self):
        return tuple(self.config.get(k) for k in SHAPE_KEYS)


def group_runs(runs):
    """Groups in order of first appearance."""
    groups = {}
    for run in runs:
        key = tuple(sorted((k, v) for k, v in run.config.items() if k not in NOT_GROUPED_BY))
        groups.setdefault(key, Group(key=key)).runs.append(run)
    return list(groups.values())


def mean_std(values):
    """(mean, sample std or None for one value, n) of the values that are not None; (None, None, 0) if none."""
    got = [v for v in values if v is not None]
    if not got:
        return None, None, 0
    return statistics.fmean(got), (statistics.stdev(got) if len(got) > 1 else None), len(got)


def extrapolation_losses(entry, mode):
    """{length in tokens: mean loss} of one run's extrapolation entry for mode nonoverlap or sliding."""
    if entry is None:
        return {}
    return {int(L): r["loss"] for L, r in entry.get(mode, {}).items()}
