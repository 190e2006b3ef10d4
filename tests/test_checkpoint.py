"""checkpoint.py, the one reader and writer of the checkpoint format: what a checkpoint directory holds, that only
complete ones are visible, pruning, reading states back exactly, model-only checkpoints, and named errors for
missing, incomplete or unreadable ones; then the same protocol under train.py (a crash mid-write, keep_last)."""

import json
from pathlib import Path

import pytest
import torch

import checkpoint as ckpt
from helpers import assert_bitwise_equal, final_weights, tiny_model, train_in_process


def stage(out_dir, step, payload=1.0):
    """A complete staged checkpoint of `step` (model, optimizer, meta, one rank's RNG), not yet published."""
    tmp = ckpt.prepare_staging(out_dir, step)
    ckpt.write_rank_files(tmp, 0)
    ckpt.write_main_files(tmp, {"w": torch.full((2,), payload)}, {"state": {}, "param_groups": [{"lr": 0.1}]},
                          dict(step=step, tokens=10 * step, config={}))
    return tmp


# --------------------------------------------------------------------------------------------------------- writing


def test_a_checkpoint_is_invisible_until_published_then_complete(tmp_path):
    tmp = stage(tmp_path, 3)
    assert ckpt.list_checkpoints(tmp_path) == [] and ckpt.latest_checkpoint(tmp_path) is None
    final = ckpt.publish(tmp_path, 3)
    assert final == tmp_path / "ckpt_0000003" and not tmp.exists()
    assert sorted(p.name for p in final.iterdir()) == ["manifest.json", "meta.json", "model.pt", "optimizer.pt",
                                                      "rng_rank0.pt"]
    assert ckpt.list_checkpoints(tmp_path) == [(3, final)]
    stage(tmp_path, 3, payload=2.0)  # the same step saved again replaces it
    ckpt.publish(tmp_path, 3)
    assert ckpt.load_states(final)[0]["w"].tolist() == [2.0, 2.0]


def test_prune_keeps_the_newest_and_the_multiples_of_keep_every(tmp_path):
    for step in range(1, 11):
        stage(tmp_path, step)
        ckpt.publish(tmp_path, step)
        ckpt.prune(tmp_path, keep_last=2, keep_every=4)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [4, 8, 9, 10]
    ckpt.prune(tmp_path, keep_last=1, keep_every=0)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [10]


def test_save_model_only_writes_the_format_without_optimizer_and_replaces_nothing(tmp_path):
    model = tiny_model("rope")
    path = ckpt.save_model_only(model, tmp_path / "run", step=5, tokens=40, extra_config={"seed": 3})
    assert path == tmp_path / "run" / "ckpt_0000005" and ckpt.latest_checkpoint(tmp_path / "run") == path
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "meta.json", "model.pt"]
    meta = ckpt.load_meta(path)
    assert meta == dict(step=5, tokens=40, config={**model.config.to_dict(), "seed": 3})
    state, optimizer = ckpt.load_states(path, optimizer=False)
    assert optimizer is None
    assert_bitwise_equal(state, model.state_dict())
    with pytest.raises(FileExistsError, match="ckpt_0000005 exists"):
        ckpt.save_model_only(model, tmp_path / "run", step=5)


# --------------------------------------------------------------------------------------------------------- reading


def test_load_states_reads_back_what_was_written(tmp_path):
    stage(tmp_path, 2, payload=0.5)
    path = ckpt.publish(tmp_path, 2)
    model_state, optim_state = ckpt.load_states(path)
    assert model_state["w"].tolist() == [0.5, 0.5] and optim_state["param_groups"] == [{"lr": 0.1}]
    # the names of a model saved through torch.compile or DDP are the unwrapped model's
    torch.save({"_orig_mod.w": torch.ones(1), "module.v": torch.zeros(1)}, path / "model.pt")
    assert sorted(ckpt.load_states(path, optimizer=False)[0]) == ["v", "w"]


def test_resolve_checkpoint_takes_a_checkpoint_or_the_newest_of_a_run(tmp_path):
    run = tmp_path / "run"
    for step in (1, 2):
        ckpt.save_model_only(tiny_model("rope"), run, step=step)
    ckpt.prepare_staging(run, 3)  # an interrupted save is never read
    assert ckpt.resolve_checkpoint(run) == run / "ckpt_0000002"
    assert ckpt.resolve_checkpoint(run / "ckpt_0000001") == run / "ckpt_0000001"


def test_missing_incomplete_and_unreadable_checkpoints_are_named_errors(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="nowhere does not exist"):
        ckpt.resolve_checkpoint(tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ckpt.CheckpointError, match="is not a directory"):
        ckpt.resolve_checkpoint(tmp_path / "file")
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint in"):
        ckpt.resolve_checkpoint(tmp_path)
    path = ckpt.save_model_only(tiny_model("rope"), tmp_path / "run", step=1)
    (path / "model.pt").rename(path / "model.bak")
    with pytest.raises(ckpt.CheckpointError, match="ckpt_0000001 is incomplete: model.pt is missing"):
        ckpt.resolve_checkpoint(path)
    (path / "model.bak").rename(path / "model.pt")
    with pytest.raises(ckpt.CheckpointError, match="ckpt_0000001: cannot read optimizer.pt"):
        ckpt.load_states(path)  # a model-only checkpoint cannot resume a training
    (path / "model.pt").write_bytes(b"not a torch file")
    with pytest.raises(ckpt.CheckpointError, match="ckpt_0000001: cannot read model.pt"):
        ckpt.load_states(path, optimizer=False)
    (path / "meta.json").write_text("{")
    with pytest.raises(ckpt.CheckpointError, match="meta.json is not valid JSON"):
        ckpt.load_meta(path)


def test_environment_changes_name_what_differs():
    env = ckpt.environment(1, torch.device("cpu"))
    assert ckpt.environment_changes({"environment": env}, env) == []
    assert ckpt.environment_changes({"environment": env}, {**env, "threads": 99}) == \
           [f"threads {env['threads']!r} -> 99"]
    assert ckpt.environment_changes({"world_size": 2}, env) == ["world_size 2 -> 1"]  # written before the record


# ------------------------------------------------------------------------------------------------ under train.py


@pytest.mark.slow
@pytest.mark.bitwise
def test_crash_during_checkpoint_write_keeps_the_previous_checkpoint(byte_shards, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_write = ckpt.write_main_files

    def crash_at_step_6(tmp, model_state, optimizer_state, meta):
        if meta["step"] == 6:
            torch.save(model_state, Path(tmp) / "model.pt")  # half-written checkpoint
            raise OSError("disk full (simulated)")
        real_write(tmp, model_state, optimizer_state, meta)

    monkeypatch.setattr(ckpt, "write_main_files", crash_at_step_6)
    with pytest.raises(OSError, match="simulated"):
        train_in_process(byte_shards, out, "--max_steps=8", "--checkpoint_interval=3")
    assert (out / ".tmp_ckpt_0000006").is_dir()
    assert ckpt.latest_checkpoint(out).name == "ckpt_0000003"
    monkeypatch.setattr(ckpt, "write_main_files", real_write)
    result = train_in_process(byte_shards, out, "--max_steps=8", "--checkpoint_interval=3")
    assert result["finished"]
    train_in_process(byte_shards, tmp_path / "reference", "--max_steps=8", "--checkpoint_interval=3")
    assert_bitwise_equal(final_weights(tmp_path / "reference"), final_weights(out))


@pytest.mark.slow
def test_keep_last_and_keep_every(byte_shards, tmp_path):
    train_in_process(byte_shards, tmp_path / "run", "--max_steps=10", "--checkpoint_interval=1", "--keep_last=2",
                     "--keep_every=4", "--eval_interval=0")
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "run")] == [4, 8, 9, 10]
    meta = ckpt.load_meta(ckpt.latest_checkpoint(tmp_path / "run"))
    assert (meta["step"], meta["reason"], meta["world_size"]) == (10, "final", 1)
    assert json.loads((tmp_path / "run" / "config.json").read_text()) == meta["config"]
