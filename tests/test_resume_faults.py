"""Bad inputs and faults at train.py's start and resume: a busy out_dir, a start that fails its checks, damaged
checkpoints (fallback to the newest one that verifies), a torn metrics.jsonl, a corrupt config.json, non-positive
sizes, data errors. Each is an `error: ...` with exit status 2 naming what is wrong, or a recovery that says so."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import checkpoint as ckpt
import train
from config import ConfigError, load_config
from helpers import (REPO, assert_bitwise_equal, child_env, final_weights, torchrun, train_args, train_in_process,
                     train_metrics)
from sweeps.results import read_run


def run_main(capsys, shard_dir, out_dir, *extra):
    """train.main in this process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    status = train.main(train_args(shard_dir, out_dir, *extra))
    out, err = capsys.readouterr()
    return status, out, err


def stage(out_dir, step):
    """A published checkpoint of `step` with a tiny payload (model, optimizer, meta with a loader state, RNG)."""
    tmp = ckpt.prepare_staging(out_dir, step)
    ckpt.write_rank_files(tmp, 0)
    meta = dict(step=step, tokens=step, loader={}, config={}, world_size=1)
    ckpt.write_main_files(tmp, {"w": torch.full((2,), float(step))}, {"state": {}, "param_groups": []}, meta)
    return ckpt.publish(out_dir, step)


# ------------------------------------------------------------------------------------------------------- the lock


@pytest.mark.slow
def test_two_concurrent_starts_exactly_one_runs(byte_shards, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "train", *train_args(byte_shards, out, "--max_steps=100000",
                                                      "--checkpoint_interval=10", "--eval_interval=0")]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env())
    for line in first.stdout:
        if line.startswith("step 2/"):
            break
    second = subprocess.run(cmd, capture_output=True, text=True, env=child_env())
    first.send_signal(signal.SIGTERM)  # the first run, still training, saves and stops
    rest = first.stdout.read()
    assert first.wait() == 0, rest
    assert second.returncode == 2, second.stderr
    assert f"error: {out} is in use: training by pid {first.pid} on host" in second.stderr
    steps = [r["step"] for r in train_metrics(out)]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) > 2
    assert not list(out.glob(".tmp_ckpt_*"))


def test_a_busy_out_dir_is_refused_with_its_holder(byte_shards, tmp_path, capsys):
    from lockfile import DirectoryLock

    out = tmp_path / "run"
    with DirectoryLock(out, "training"):
        status, _, err = run_main(capsys, byte_shards, out, "--max_steps=2")
    assert status == 2 and "is in use: training by pid" in err and "(lock " in err
    assert not (out / "config.json").exists()


# ------------------------------------------------------------------------------------- checks before writing out_dir


@pytest.mark.slow
def test_a_start_that_fails_the_data_check_leaves_out_dir_free(shards, tmp_path, capsys):
    """GPT-2 shards hold ids far above 1000: the data check refuses the run before config.json is written, so the
    fixed command then runs into the same out_dir."""
    out = tmp_path / "run"
    status, _, err = run_main(capsys, shards, out, "--vocab_size=1000", "--max_steps=1")
    assert status == 2 and "error: " in err and "is >= vocab_size 1000" in err
    assert not (out / "config.json").exists()
    status, _, err = run_main(capsys, shards, out, "--max_steps=1", "--eval_interval=0")
    assert status == 0, err
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 50304


@pytest.mark.parametrize("key", ["block_size", "n_layer", "n_head", "n_embd", "head_dim", "global_batch_size",
                                 "micro_batch_size", "max_steps"])
def test_non_positive_sizes_are_refused_before_anything_is_written(byte_shards, tmp_path, capsys, key):
    out = tmp_path / "run"
    status, _, err = run_main(capsys, byte_shards, out, f"--{key}=0")
    assert status == 2, err
    assert f"error: override '--{key}=0'" in err and key in err and "got 0" in err
    assert not out.exists()


def test_a_command_line_value_is_blamed_on_the_command_line(tmp_path):
    toml = REPO / "configs" / "tiny" / "rope.toml"
    with pytest.raises(ConfigError, match=r"^override '--warmup_steps=-1': key 'warmup_steps' must be >= 0"):
        load_config(toml, ["--warmup_steps=-1"])
    bad = tmp_path / "bad.toml"
    bad.write_text(f'base = "{toml}"\nwarmup_steps = -1\n')
    with pytest.raises(ConfigError, match=rf"^{bad}: key 'warmup_steps' must be >= 0"):
        load_config(bad)


@pytest.mark.parametrize("fault", ["empty", "bad_magic", "token_range"])
def test_data_errors_are_named_errors(byte_shards, tmp_path, capsys, fault):
    import shutil

    from data import shards

    data = tmp_path / "data"
    if fault == "empty":
        data.mkdir()
        expected = "no train shards found"
    else:
        shutil.copytree(byte_shards, data)
        shard = sorted(data.glob("*_train_*.bin"))[0]
        raw = bytearray(shard.read_bytes())
        if fault == "bad_magic":
            raw[:4] = b"\0\0\0\0"
            expected = "bad magic"
        else:  # every 32nd token of the first training shard: every window of it holds one
            tokens = memoryview(raw)[shards.HEADER_BYTES:].cast("H")
            for i in range(0, len(tokens), 32):
                tokens[i] = 60000
            del tokens
            expected = "is >= vocab_size 320"
        shard.write_bytes(bytes(raw))
    status, _, err = run_main(capsys, byte_shards, tmp_path / "run", f"--data_dir={data}", "--max_steps=20",
                              "--eval_interval=0", "--checkpoint_interval=1000", "--log_interval=100")
    assert status == 2, err
    assert err.startswith("error: ") and expected in err


@pytest.mark.slow
def test_a_bad_token_on_one_rank_stops_every_rank(byte_shards, tmp_path):
    """A token >= vocab_size in a window that only rank 1 reads, at its third micro-step: rank 1 names it, rank 0
    stops at the same step instead of waiting for rank 1 in the next collective; both exit 2."""
    import shutil

    from data import shards
    from data.loader import TokenLoader

    data = tmp_path / "data"
    shutil.copytree(byte_shards, data)
    # train_args' geometry on 2 processes: block_size 64, 4 sequences per rank and micro-step, data_seed 42
    loader = TokenLoader(data, seq_len=64, batch_size=4, rank=1, world_size=2, seed=42, vocab_size=320)
    shard_index, start = loader.window_location(loader.windows_for(epoch=0, position=2 * 2 * 4)[:1])
    shard_path, position = loader.paths[int(shard_index[0])], int(start[0]) + 32  # mid-window: no neighbour reads it
    loader.close()
    raw = bytearray(Path(shard_path).read_bytes())
    memoryview(raw)[shards.HEADER_BYTES:].cast("H")[position] = 60000
    Path(shard_path).write_bytes(bytes(raw))
    done = torchrun(2, byte_shards, tmp_path / "run", f"--data_dir={data}", "--max_steps=6", "--eval_interval=0",
                    "--checkpoint_interval=1", check=False, timeout=180)
    log = done.stdout + done.stderr
    assert done.returncode != 0, log
    assert f"error: {shard_path}: token 60000 at position {position} is >= vocab_size 320" in log
    assert "error: another process of this job failed at reading the training data at step 2" in log
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "run")] == [1, 2]  # the steps before it are kept


# --------------------------------------------------------------------------------------------- damaged checkpoints


def test_a_checkpoint_carries_a_manifest_that_verify_files_checks(tmp_path):
    path = stage(tmp_path, 1)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format"] == "size+crc32_head_tail"
    assert sorted(manifest["files"]) == ["meta.json", "model.pt", "optimizer.pt", "rng_rank0.pt"]
    ckpt.verify_files(path)
    data = (path / "model.pt").read_bytes()
    (path / "model.pt").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(ckpt.CheckpointError, match="model.pt does not match its checksum"):
        ckpt.verify_files(path)


@pytest.mark.parametrize("damage", ["truncate model.pt", "delete optimizer.pt", "delete meta.json",
                                    "delete rng_rank0.pt"])
def test_resume_skips_a_damaged_newest_checkpoint_and_keeps_it(tmp_path, damage):
    for step in (1, 2):
        stage(tmp_path, step)
    newest = tmp_path / "ckpt_0000002"
    action, name = damage.split()
    if action == "truncate":
        (newest / name).write_bytes((newest / name).read_bytes()[:100])
    else:
        (newest / name).unlink()
    said = []
    resume = ckpt.newest_resumable(tmp_path, 0, 1, report=said.append)
    assert resume.path == tmp_path / "ckpt_0000001" and resume.model_state["w"].tolist() == [1.0, 1.0]
    assert len(said) == 1 and f"skipping checkpoint {newest}" in said[0] and name in said[0]
    assert newest.is_dir()  # never deleted
    ckpt.prune(tmp_path, keep_last=1, keep_every=0)  # the damaged one is neither counted nor deleted
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [1, 2]


def test_a_checkpoint_without_a_manifest_still_loads(tmp_path):
    path = stage(tmp_path, 1)
    (path / "manifest.json").unlink()
    assert ckpt.newest_resumable(tmp_path, 0, 1).path == path
    (path / "rng_rank0.pt").unlink()
    with pytest.raises(ckpt.CheckpointError, match=r"no checkpoint in .* verifies: .*rng_rank0.pt is missing"):
        ckpt.newest_resumable(tmp_path, 0, 1)
    assert ckpt.newest_resumable(tmp_path, 0, 2).rng is None  # another world size needs no RNG file


def test_a_new_save_of_a_damaged_checkpoints_step_sets_it_aside(tmp_path):
    path = stage(tmp_path, 1)
    (path / "optimizer.pt").unlink()
    stage(tmp_path, 1)
    assert ckpt.is_verified(path) and (tmp_path / "ckpt_0000001.damaged").is_dir()


@pytest.mark.slow
@pytest.mark.bitwise
def test_kill_during_a_checkpoint_write_then_damage_the_previous_one(byte_shards, tmp_path, capsys):
    """Killed with -9 while writing the checkpoint of step 6, and ckpt_0000004 damaged too: the resume falls back
    two levels to ckpt_0000002, names what it skipped, and ends bit for bit where an uninterrupted run ends. With
    no checkpoint left that verifies, the start is refused (exit 2)."""
    common = ["--max_steps=6", "--checkpoint_interval=2", "--keep_last=3"]
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "train", *train_args(byte_shards, out, *common)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env())
    for line in proc.stdout:
        if line.startswith("step 6/"):
            while proc.poll() is None and not (out / ".tmp_ckpt_0000006").is_dir():
                pass
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    assert [s for s, _ in ckpt.list_checkpoints(out)] in ([2, 4], [2, 4, 6])
    if (out / "ckpt_0000006").exists():  # the kill came after the rename: damage it as a torn write would
        (out / "ckpt_0000006" / "model.pt").write_bytes(b"")
    (out / "ckpt_0000004" / "optimizer.pt").unlink()
    done = subprocess.run(cmd, capture_output=True, text=True, env=child_env())
    assert done.returncode == 0, done.stderr
    assert f"skipping checkpoint {out / 'ckpt_0000004'}" in done.stdout
    assert f"resumed from {out / 'ckpt_0000002'} at step 2" in done.stdout
    reference = tmp_path / "reference"
    subprocess.run([sys.executable, "-m", "train", *train_args(byte_shards, reference, *common)], check=True,
                   capture_output=True, env=child_env())
    assert_bitwise_equal(final_weights(reference), final_weights(out))
    assert [r["step"] for r in train_metrics(out)] == [1, 2, 3, 4, 5, 6]

    for _, path in ckpt.list_checkpoints(out):
        (path / "model.pt").write_bytes(b"x")
    failed = subprocess.run(cmd, capture_output=True, text=True, env=child_env())
    assert failed.returncode == 2 and f"error: no checkpoint in {out} verifies" in failed.stderr


# ------------------------------------------------------------------------------------------------ run files


@pytest.mark.slow
def test_a_corrupt_config_json_is_a_named_error(byte_shards, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text('{"n_layer": 2,')
    status, _, err = run_main(capsys, byte_shards, out, "--max_steps=1")
    assert status == 2
    assert f"error: {out / 'config.json'}: the run's config is not valid JSON" in err and "line 1 column" in err


@pytest.mark.slow
def test_a_torn_last_metrics_line_is_dropped_with_a_warning(byte_shards, tmp_path, capsys):
    out = tmp_path / "run"
    train_in_process(byte_shards, out, "--max_steps=2", "--checkpoint_interval=2")
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"event": "train", "st')
    torn_line = len((out / "metrics.jsonl").read_text().splitlines())
    capsys.readouterr()
    assert read_run(out).train[-1]["step"] == 2
    assert f"warning: {out / 'metrics.jsonl'}: line {torn_line} is incomplete" in capsys.readouterr().err
    status, _, err = run_main(capsys, byte_shards, out, "--max_steps=4", "--checkpoint_interval=2")
    assert status == 0, err
    assert f"{out / 'metrics.jsonl'}: line {torn_line} is incomplete" in err
    assert [r["step"] for r in train_metrics(out)] == [1, 2, 3, 4]


def test_damaged_metrics_before_the_last_line_is_a_named_error(tmp_path):
    from config import read_metrics_file

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1}\n{"st\n{"step": 2}\n')
    with pytest.raises(ConfigError, match=rf"{metrics}: line 2 is not valid JSON"):
        read_metrics_file(metrics)
