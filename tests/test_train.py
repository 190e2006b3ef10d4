"""train.py end to end on the embedded real-text sample: learning, exact resume, pre-emption, DDP/FSDP2 equivalence.
(Config behaviour: test_config.py; the checkpoint format, its atomicity and pruning: test_checkpoint.py.)"""

import json
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import checkpoint as ckpt
import train
from config import ConfigError, load_config
from helpers import (COMPARE_THREADS, REPO, assert_bitwise_equal, assert_runs_close, child_env, final_weights,
                     torch_threads, torchrun, train_args, train_in_process, train_metrics)


# ---------------------------------------------------------------------------------------------------------- learning


@pytest.mark.slow
def test_tiny_model_learns_real_text(byte_shards, tmp_path):
    """The validation loss falls well below that of the best context-free model, the training text's unigram
    distribution scored on the validation tokens (its cross-entropy there), within a minute: the model uses context.
    (The loss also starts near log(256), far above it.)"""
    from data import shards as S

    train_tokens = np.concatenate([np.asarray(S.open_shard(p)) for p in S.find_shards(byte_shards, "train")])
    val_targets = np.asarray(S.open_shard(S.find_shards(byte_shards, "val")[0]))[1:8193]  # the 8,192 scored
    counts = np.bincount(train_tokens, minlength=320).astype(np.float64) + 0.01  # smoothed: unseen ids finite
    unigram_xent = float(-np.log(counts[val_targets] / counts.sum()).mean())
    result = train_in_process(byte_shards, tmp_path / "run", "--vocab_size=320", "--max_steps=250",
                              "--lr_decay_steps=250", "--eval_interval=125", "--learning_rate=1e-2", "--min_lr=1e-3",
                              "--log_interval=5", "--checkpoint_interval=250")
    assert result["finished"]
    losses = [r["loss"] for r in train_metrics(tmp_path / "run")]
    assert losses[0] > unigram_xent + 1.0  # starts near log(320) = 5.8
    assert result["val_loss"] < unigram_xent - 0.5, (result["val_loss"], unigram_xent)


@pytest.mark.slow
@pytest.mark.parametrize("pe", ["alibi", "fox", "grape_m_ctx", "grape_ap", "pope", "rope_id", "grape_m_rank2",
                                "grape_m_basis", "grape_m_mix", "grape_m+grape_a_qk"])
def test_other_encodings_train(byte_shards, tmp_path, pe):
    """Every PE trains through train.py (KV-shift on): the loss falls by more than 1 nat in 20 steps."""
    result = train_in_process(byte_shards, tmp_path / pe, f"--pos_encoding={pe}", "--kv_shift=true",
                              "--max_steps=20", "--eval_interval=20")
    losses = [r["loss"] for r in train_metrics(tmp_path / pe)]
    assert result["finished"] and losses[-1] < losses[0] - 1.0


# ---------------------------------------------------------------------------------------------------------- resume


@pytest.mark.slow
@pytest.mark.bitwise
def test_resume_is_bitwise_and_finished_runs_are_skipped(byte_shards, tmp_path):
    train_in_process(byte_shards, tmp_path / "straight", "--max_steps=8", "--checkpoint_interval=4")
    train_in_process(byte_shards, tmp_path / "split", "--max_steps=5", "--checkpoint_interval=4")  # saves 4 and 5
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "split")] == [4, 5]
    train_in_process(byte_shards, tmp_path / "split", "--max_steps=8", "--checkpoint_interval=4")  # resumes at 5
    assert_bitwise_equal(final_weights(tmp_path / "straight"), final_weights(tmp_path / "split"))
    straight = [r["loss"] for r in train_metrics(tmp_path / "straight")]
    split = [r["loss"] for r in train_metrics(tmp_path / "split")]
    assert straight == split
    again = train_in_process(byte_shards, tmp_path / "split", "--max_steps=8")
    assert again == dict(step=8, finished=True)


@pytest.mark.slow
@pytest.mark.bitwise
def test_sigkill_at_a_random_step_then_resume_is_bitwise(byte_shards, tmp_path):
    reference = tmp_path / "reference"
    train_in_process(byte_shards, reference, "--max_steps=12", "--checkpoint_interval=3", threads=COMPARE_THREADS)
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "train",
           *train_args(byte_shards, killed, "--max_steps=12", "--checkpoint_interval=3")]
    kill_at = int(np.random.default_rng().integers(4, 11))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env())
    for line in proc.stdout:
        if line.startswith(f"step {kill_at}/"):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert ckpt.latest_checkpoint(killed) is not None
    done = subprocess.run(cmd, capture_output=True, text=True, env=child_env())
    assert done.returncode == 0, done.stderr
    assert "resumed from" in done.stdout and "the continuation is bit for bit" in done.stdout
    assert_bitwise_equal(final_weights(reference), final_weights(killed))


@pytest.mark.slow
@pytest.mark.bitwise
def test_resume_says_what_changed_that_bitwise_continuation_needs(byte_shards, tmp_path, capsys):
    """Checkpoints record world size, device, CPU, instruction set, thread count and torch build; resuming with a
    different thread count continues, with a warning naming the change."""
    out = tmp_path / "run"
    train_in_process(byte_shards, out, "--max_steps=2", threads=1)
    env = ckpt.load_meta(ckpt.latest_checkpoint(out))["environment"]
    assert env == ckpt.environment(1, torch.device("cpu")) | {"threads": 1}
    assert set(env) == {"world_size", "device", "torch", "device_name", "cpu_capability", "threads"}
    capsys.readouterr()
    argv = train_args(byte_shards, out, "--max_steps=4")
    with torch_threads(2):
        assert train.train(load_config(argv[0], argv[1:]))["finished"]
    text = capsys.readouterr().out
    assert "warning: resuming with threads 1 -> 2: the run continues the same optimisation" in text
    assert ckpt.environment_changes({"world_size": 2}, env) == ["world_size 2 -> 1"]  # a checkpoint from before


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(byte_shards, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "train",
           *train_args(byte_shards, out, "--max_steps=50", "--checkpoint_interval=100")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env())
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


@pytest.mark.slow
def test_nonfinite_loss_stops_without_saving(byte_shards, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train_in_process(byte_shards, out, "--max_steps=4", "--checkpoint_interval=2")
    original = train.GPT.forward

    def poisoned(self, idx, targets=None, **kw):
        logits, loss = original(self, idx, targets, **kw)
        return logits, loss * float("nan")

    monkeypatch.setattr(train.GPT, "forward", poisoned)
    with pytest.raises(SystemExit) as exit_info:
        train_in_process(byte_shards, out, "--max_steps=8", "--checkpoint_interval=1")
    assert exit_info.value.code == train.EXIT_NONFINITE
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [2, 4]
    assert train_metrics(out, "nonfinite")[0]["step"] == 4


# ---------------------------------------------------------------------------------------------------------- distributed


@pytest.mark.slow
@pytest.mark.bitwise
def test_two_processes_equal_one_process_with_accumulation(byte_shards, tmp_path):
    """2 processes x 1 micro-step of 4 and 1 process x 2 micro-steps of 4 see the same 8 sequences per step."""
    common = ["--max_steps=6", "--global_batch_size=8", "--micro_batch_size=4", "--checkpoint_interval=6",
              "--eval_interval=6"]
    train_in_process(byte_shards, tmp_path / "one", *common, threads=COMPARE_THREADS)
    torchrun(2, byte_shards, tmp_path / "ddp", *common)
    assert_runs_close(tmp_path / "one", tmp_path / "ddp", steps=6, loss_tol=1e-6, val_tol=1e-6)


@pytest.mark.slow
@pytest.mark.bitwise
def test_fsdp2_trains_and_resumes(shards, tmp_path):
    """FSDP2 on 2 CPU processes, stopped and resumed, ends bitwise where DDP ends: at world size 2 the reduce-scatter
    and the all-reduce add the same two terms, and the gradient norm (hence the clip) is accumulated in fp64. The
    steps are clipped (grad norm > 1 early on), so the clip path is exercised."""
    common = ["--global_batch_size=8", "--micro_batch_size=4", "--checkpoint_interval=3", "--eval_interval=6"]
    torchrun(2, shards, tmp_path / "ddp", "--max_steps=6", *common)
    torchrun(2, shards, tmp_path / "fsdp", "--max_steps=3", "--fsdp=true", *common)
    done = torchrun(2, shards, tmp_path / "fsdp", "--max_steps=6", "--fsdp=true", *common)
    assert "resumed from" in done.stdout
    ddp, fsdp = train_metrics(tmp_path / "ddp"), train_metrics(tmp_path / "fsdp")
    assert [r["step"] for r in fsdp] == [1, 2, 3, 4, 5, 6]
    assert any(r["grad_norm"] > 1.0 for r in ddp)
    assert [r["loss"] for r in fsdp] == [r["loss"] for r in ddp]
    for a, b in zip(ddp, fsdp):  # fp64 sums in another order: equal to ~1e-15, far below fp32 resolution
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-12)
    assert_bitwise_equal(final_weights(tmp_path / "ddp"), final_weights(tmp_path / "fsdp"))


# ------------------------------------------------------------------------------- run directory, batch, reference loop


@pytest.mark.slow
def test_a_different_run_in_the_same_out_dir_is_refused(byte_shards, tmp_path):
    train_in_process(byte_shards, tmp_path / "run", "--max_steps=2")
    with pytest.raises(ConfigError, match=r"different config \(pos_encoding: 'rope' -> 'alibi'\)"):
        train_in_process(byte_shards, tmp_path / "run", "--max_steps=4", "--pos_encoding=alibi")


def test_micro_batch_adapts_to_the_world_size():
    cfg = load_config(REPO / "configs" / "medium" / "rope.toml")  # 480 sequences, micro-batch 20
    assert [train.micro_batch_for(cfg, w) for w in (1, 8, 16, 32, 48, 480)] == \
           [(20, 24), (20, 3), (15, 2), (15, 1), (10, 1), (1, 1)]
    with pytest.raises(ConfigError, match="not divisible by the world size 64"):
        train.micro_batch_for(cfg, 64)


@pytest.mark.slow
def test_reference_quirks_reproduce_the_summed_gradient_and_the_extra_update(byte_shards, tmp_path):
    """reference_loop_quirks: the gradient is global / (8 x micro) = 3 times the mean gradient (the reference's
    un-divided 3-step accumulation on 8 GPUs), also on one process here; the first update has lr 0; max_steps + 1
    updates run. Same data and init, so the first pre-clip gradient norms differ exactly by that factor."""
    common = ["--global_batch_size=48", "--micro_batch_size=2", "--max_steps=2", "--lr_decay_steps=2",
              "--eval_interval=0", "--checkpoint_interval=10"]
    train_in_process(byte_shards, tmp_path / "plain", *common)
    train_in_process(byte_shards, tmp_path / "quirks", *common, "--reference_loop_quirks=true")
    plain, quirks = train_metrics(tmp_path / "plain"), train_metrics(tmp_path / "quirks")
    assert [r["step"] for r in plain] == [1, 2] and [r["step"] for r in quirks] == [1, 2, 3]
    assert quirks[0]["lr"] == 0.0 and plain[0]["lr"] > 0.0
    assert quirks[0]["grad_norm"] == pytest.approx(3.0 * plain[0]["grad_norm"], rel=1e-5)
    assert quirks[0]["loss"] == pytest.approx(plain[0]["loss"], abs=1e-6)


@pytest.mark.slow
def test_resume_after_a_crash_keeps_each_step_once_in_the_metrics(byte_shards, tmp_path):
    """Steps logged after the last checkpoint of a crashed run are re-run on resume; their first records move to
    metrics_discarded.jsonl, so metrics.jsonl has every step once and in order."""
    import shutil

    out = tmp_path / "run"
    train_in_process(byte_shards, out, "--max_steps=5", "--checkpoint_interval=3")
    shutil.rmtree(ckpt.latest_checkpoint(out))  # as if the run had died after step 5, before its final checkpoint
    train_in_process(byte_shards, out, "--max_steps=5", "--checkpoint_interval=3")
    assert [r["step"] for r in train_metrics(out)] == [1, 2, 3, 4, 5]
    discarded = [json.loads(line) for line in (out / "metrics_discarded.jsonl").read_text().splitlines()]
    assert sorted({r["step"] for r in discarded if r.get("event") == "train"}) == [4, 5]
