"""train.py end to end on the embedded real-text sample: learning, exact resume, pre-emption, DDP/FSDP2 equivalence."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import checkpoint as ckpt
import train
from config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
TINY = ["--n_layer=2", "--n_head=2", "--n_embd=64", "--head_dim=32", "--block_size=64", "--global_batch_size=8",
        "--micro_batch_size=8", "--learning_rate=3e-3", "--min_lr=3e-4", "--warmup_steps=5", "--val_tokens=8192",
        "--log_interval=1", "--wandb=disabled", "--device=cpu", "--compile=false"]


def args_for(shards, out_dir, *extra):
    return [str(REPO / "configs" / "tiny" / "rope.toml"), f"--data_dir={shards}", f"--out_dir={out_dir}", *TINY,
            *extra]


def run_in_process(shards, out_dir, *extra):
    argv = args_for(shards, out_dir, *extra)
    return train.train(load_config(argv[0], argv[1:]))


def metrics(out_dir, event="train"):
    lines = (Path(out_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("event") == event]


def final_weights(out_dir):
    return torch.load(ckpt.latest_checkpoint(out_dir) / "model.pt", weights_only=True)


def assert_bitwise_equal(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def subprocess_env():
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    env.pop("RANK", None)
    return env


# ---------------------------------------------------------------------------------------------------------- learning


def test_tiny_model_learns_real_text(shards, tmp_path):
    """Within ~150 steps (well under a minute) the loss falls well below the unigram entropy of the training text,
    i.e. the model uses context, not just token frequencies."""
    train_tokens = np.concatenate([np.fromfile(p, dtype=np.uint16, offset=1024)
                                   for p in sorted(shards.glob("*_train_*.bin"))])
    p = np.bincount(train_tokens).astype(np.float64)
    p = p[p > 0] / p.sum()
    unigram_entropy = float(-(p * np.log(p)).sum())
    result = run_in_process(shards, tmp_path / "run", "--max_steps=150", "--lr_decay_steps=150", "--eval_interval=50",
                            "--learning_rate=1e-2", "--min_lr=1e-3", "--log_interval=10")
    assert result["finished"]
    losses = [r["loss"] for r in metrics(tmp_path / "run")]
    assert losses[0] > unigram_entropy  # starts near log(50304) = 10.8
    assert result["val_loss"] < unigram_entropy - 0.5, (result["val_loss"], unigram_entropy)


@pytest.mark.parametrize("pe", ["alibi", "fox", "grape_m_ctx", "grape_ap"])
def test_other_encodings_train(shards, tmp_path, pe):
    result = run_in_process(shards, tmp_path / pe, f"--pos_encoding={pe}", "--kv_shift=true", "--max_steps=20",
                            "--eval_interval=20")
    losses = [r["loss"] for r in metrics(tmp_path / pe)]
    assert result["finished"] and losses[-1] < losses[0] - 1.0


# ---------------------------------------------------------------------------------------------------------- resume


def test_resume_is_bitwise_and_finished_runs_are_skipped(shards, tmp_path):
    run_in_process(shards, tmp_path / "straight", "--max_steps=8", "--checkpoint_interval=4")
    run_in_process(shards, tmp_path / "split", "--max_steps=5", "--checkpoint_interval=4")  # saves 4 and 5
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "split")] == [4, 5]
    run_in_process(shards, tmp_path / "split", "--max_steps=8", "--checkpoint_interval=4")  # resumes at 5
    assert_bitwise_equal(final_weights(tmp_path / "straight"), final_weights(tmp_path / "split"))
    straight = [r["loss"] for r in metrics(tmp_path / "straight")]
    split = [r["loss"] for r in metrics(tmp_path / "split")]
    assert straight == split
    again = run_in_process(shards, tmp_path / "split", "--max_steps=8")
    assert again == dict(step=8, finished=True)


def test_sigkill_at_a_random_step_then_resume_is_bitwise(shards, tmp_path):
    reference = tmp_path / "reference"
    run_in_process(shards, reference, "--max_steps=12", "--checkpoint_interval=3")
    killed = tmp_path / "killed"
    cmd = [sys.executable, str(REPO / "train.py"), *args_for(shards, killed, "--max_steps=12",
                                                              "--checkpoint_interval=3")]
    kill_at = int(np.random.default_rng().integers(4, 11))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=subprocess_env())
    for line in proc.stdout:
        if line.startswith(f"step {kill_at}/"):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert ckpt.latest_checkpoint(killed) is not None
    done = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env())
    assert done.returncode == 0, done.stderr
    assert "resumed from" in done.stdout
    assert_bitwise_equal(final_weights(reference), final_weights(killed))


def test_crash_during_checkpoint_write_keeps_the_previous_checkpoint(shards, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_write = ckpt.write_main_files

    def crash_at_step_6(tmp, model_state, optimizer_state, meta):
        if meta["step"] == 6:
            torch.save(model_state, Path(tmp) / "model.pt")  # half-written checkpoint
            raise OSError("disk full (simulated)")
        real_write(tmp, model_state, optimizer_state, meta)

    monkeypatch.setattr(ckpt, "write_main_files", crash_at_step_6)
    with pytest.raises(OSError, match="simulated"):
        run_in_process(shards, out, "--max_steps=8", "--checkpoint_interval=3")
    assert (out / ".tmp_ckpt_0000006").is_dir()
    assert ckpt.latest_checkpoint(out).name == "ckpt_0000003"
    monkeypatch.setattr(ckpt, "write_main_files", real_write)
    result = run_in_process(shards, out, "--max_steps=8", "--checkpoint_interval=3")
    assert result["finished"]
    run_in_process(shards, tmp_path / "reference", "--max_steps=8", "--checkpoint_interval=3")
    assert_bitwise_equal(final_weights(tmp_path / "reference"), final_weights(out))


def test_keep_last_and_keep_every(shards, tmp_path):
    run_in_process(shards, tmp_path / "run", "--max_steps=10", "--checkpoint_interval=1", "--keep_last=2",
                   "--keep_every=4", "--eval_interval=0")
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "run")] == [4, 8, 9, 10]


def test_sigterm_saves_and_exits_cleanly(shards, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "train.py"), *args_for(shards, out, "--max_steps=50",
                                                              "--checkpoint_interval=100")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=subprocess_env())
    for line in proc.stdout:
        if line.startswith("step 3/"):
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.stdout.read()
    assert proc.wait() == 0, rest
    assert "pre-emption signal" in rest
    step = ckpt.load_meta(ckpt.latest_checkpoint(out))["step"]
    assert 3 <= step < 50
    assert ckpt.load_meta(ckpt.latest_checkpoint(out))["reason"] == "signal SIGTERM"


def test_nonfinite_loss_stops_without_saving(shards, tmp_path, monkeypatch):
    out = tmp_path / "run"
    run_in_process(shards, out, "--max_steps=4", "--checkpoint_interval=2")
    original = train.GPT.forward

    def poisoned(self, idx, targets=None, **kw):
        logits, loss = original(self, idx, targets, **kw)
        return logits, loss * float("nan")

    monkeypatch.setattr(train.GPT, "forward", poisoned)
    with pytest.raises(SystemExit) as exit_info:
        run_in_process(shards, out, "--max_steps=8", "--checkpoint_interval=1")
    assert exit_info.value.code == train.EXIT_NONFINITE
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [2, 4]
    assert metrics(out, "nonfinite")[0]["step"] == 4


# ---------------------------------------------------------------------------------------------------------- distributed


def torchrun(nproc, shards, out_dir, *extra):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(REPO / "train.py"), *args_for(shards, out_dir, *extra)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def test_two_processes_equal_one_process_with_accumulation(shards, tmp_path):
    """2 processes x 1 micro-step of 4 and 1 process x 2 micro-steps of 4 see the same 8 sequences per step."""
    common = ["--max_steps=6", "--global_batch_size=8", "--micro_batch_size=4", "--checkpoint_interval=6",
              "--eval_interval=6"]
    run_in_process(shards, tmp_path / "one", *common)
    torchrun(2, shards, tmp_path / "ddp", *common)
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "ddp")
    assert len(one) == len(two) == 6
    for a, b in zip(one, two):
        assert abs(a["loss"] - b["loss"]) <= 1e-6, (a, b)
    assert abs(metrics(tmp_path / "one", "val")[-1]["val_loss"] - metrics(tmp_path / "ddp", "val")[-1]["val_loss"]) <= 1e-6


def test_fsdp2_trains_and_resumes(shards, tmp_path):
    """FSDP2 on 2 CPU processes: same losses as DDP, and a resumed run continues exactly."""
    common = ["--global_batch_size=8", "--micro_batch_size=4", "--checkpoint_interval=3", "--eval_interval=6"]
    torchrun(2, shards, tmp_path / "ddp", "--max_steps=6", *common)
    torchrun(2, shards, tmp_path / "fsdp", "--max_steps=3", "--fsdp=true", *common)
    done = torchrun(2, shards, tmp_path / "fsdp", "--max_steps=6", "--fsdp=true", *common)
    assert "resumed from" in done.stdout
    ddp, fsdp = metrics(tmp_path / "ddp"), metrics(tmp_path / "fsdp")
    assert [r["step"] for r in fsdp] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(ddp, fsdp):
        assert abs(a["loss"] - b["loss"]) <= 1e-5, (a, b)
    ddp_w, fsdp_w = final_weights(tmp_path / "ddp"), final_weights(tmp_path / "fsdp")
    for name in ddp_w:  # reduce-scatter and all-reduce sum in different orders: equal up to rounding
        torch.testing.assert_close(fsdp_w[name], ddp_w[name], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------- configs


def test_bad_configs_give_named_errors(shards, tmp_path, capsys):
    base = args_for(shards, tmp_path / "run")
    for extra, expected in [(["--pos_encodng=rope"], "unknown key 'pos_encodng'; did you mean 'pos_encoding'"),
                            (["--max_steps=ten"], "key 'max_steps' must be int"),
                            (["--pos_encoding=rotary"], "unknown GPTConfig.pos_encoding 'rotary'"),
                            (["--wandb=yes"], "key 'wandb' must be one of"),
                            (["--global_batch_size=12", "--micro_batch_size=8"], "global_batch_size=12 must be")]:
        assert train.main(base + extra) == 2
        assert expected in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text('base = "missing.toml"\n')
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(bad)
    bad.write_text('lr = 0.1\n')
    with pytest.raises(ConfigError, match=f"{bad}: unknown key 'lr'"):
        load_config(bad)
    bad.write_text('n_layer = "two"\n')
    with pytest.raises(ConfigError, match="key 'n_layer' must be int"):
        load_config(bad)


def test_a_different_run_in_the_same_out_dir_is_refused(shards, tmp_path):
    run_in_process(shards, tmp_path / "run", "--max_steps=2")
    with pytest.raises(ConfigError, match=r"different config \(pos_encoding: 'rope' -> 'alibi'\)"):
        run_in_process(shards, tmp_path / "run", "--max_steps=4", "--pos_encoding=alibi")


def test_every_shipped_config_loads():
    for path in sorted((REPO / "configs").rglob("*.toml")):
        if path.parent.name == "sweeps":
            continue  # sweep specs, not train.py configs (tests/test_sweep.py loads them)
        cfg = load_config(path)
        if path.parent.name in ("medium", "large"):
            assert cfg.global_batch_size == 480 and cfg.model.block_size == 4096 and cfg.max_steps == 25000
    assert len(list((REPO / "configs" / "medium").glob("*.toml"))) == 18
    assert len(list((REPO / "configs" / "large").glob("*.toml"))) == 12
