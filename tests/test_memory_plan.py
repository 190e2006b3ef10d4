"""memory_plan.py: the model-state formula against the tensors a training step really holds, the activation estimate
against the peak memory of CPU trainings (scripts/bench_memory.py), train.py's start-up refusal of a run that cannot
fit (before anything is written into out_dir), and scripts/plan.py."""

import pytest
import torch

import memory_plan
from scripts import bench_memory, plan
import train
from helpers import REPO, train_args
from model import GPT, GPTConfig


def storage_bytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("pe, kv_shift", [("rope", False), ("grape_ap", True), ("grape_m+grape_ap", False)])
def test_model_state_formula_equals_the_tensors_after_an_adamw_step(pe, kv_shift):
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=64, head_dim=32, block_size=16, vocab_size=128, pos_encoding=pe,
                    kv_shift=kv_shift)
    model = GPT(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _, loss = model(torch.randint(0, 128, (2, 16)), torch.randint(0, 128, (2, 16)))
    loss.backward()
    optimizer.step()
    params = list(model.parameters())
    held = storage_bytes(params) + storage_bytes(p.grad for p in params)
    held += storage_bytes(t for state in optimizer.state.values() for t in state.values())
    shape = memory_plan.model_shape(cfg)
    assert shape.params == model.num_params() and shape.tensors == len(params)
    assert memory_plan.model_state_bytes(shape) == held
    assert memory_plan.model_state_bytes(shape, world=2) == held + storage_bytes(params)  # DDP's gradient buckets
    largest = max(sum(p.numel() for p in block.parameters()) for block in model.transformer.h)
    assert shape.largest_block == largest
    fsdp = memory_plan.model_state_bytes(shape, world=4, fsdp=True)
    assert fsdp == 16 * shape.params // 4 + 4 * shape.tensors + 4 * largest


def test_a_7b_shape_is_counted_without_allocating():
    cfg = GPTConfig(n_layer=32, n_head=32, n_embd=4096, head_dim=128, pos_encoding="fox")
    shape = memory_plan.model_shape(cfg)  # meta device: 7B parameters would take 28 GB here
    block = 4 * 4096 * 4096 + 3 * 4096 * (8 * 4096 // 3) + 2 * 4096 + 128 * 2 + (4096 * 32 + 32)  # + FoX's gate
    assert shape.params == 50304 * 4096 + 32 * block + 4096
    assert shape.largest_block == block


def test_a_model_that_cannot_fit_is_refused_before_out_dir_is_written(byte_shards, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(memory_plan, "available_bytes", lambda device: (50 * 2 ** 20, "free on cuda:0 (fake)"))
    out = tmp_path / "run"
    status = train.main(train_args(byte_shards, out, "--n_embd=512", "--n_head=4", "--head_dim=128",
                                   "--max_steps=1"))
    err = capsys.readouterr().err
    assert status == 2, err
    assert err.startswith("error: the model state ") and "exceeds the 50.0 MiB free on cuda:0 (fake)" in err
    assert "before any activation" in err
    assert "parameters: fp32 weights, gradients and AdamW moments, one process" in err
    assert not out.exists()


def test_the_start_up_line_names_the_estimate_and_the_memory(byte_shards, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(memory_plan, "available_bytes", lambda device: (None, "unknown for device type x"))
    train.main(train_args(byte_shards, tmp_path / "run", "--max_steps=1", "--eval_interval=0"))
    out = capsys.readouterr().out
    assert "memory: estimated peak " in out and "MiB = model state 1.8 MiB per process (" in out and "not checked" in out
    assert "GiB measured (peak RSS of the process, runtime included)" in out


@pytest.mark.parametrize("pe, kv_shift, bf16", [("rope", False, False), ("grape_ap", True, False), ("fox", False, True)])
def test_a_blocks_saved_bytes_are_linear_in_batch_and_length(pe, kv_shift, bf16):
    """The three measurements fix B T a + T b + c; a fourth, at another batch and length, lands on it exactly."""
    cfg = GPTConfig(n_layer=1, n_head=2, n_embd=64, head_dim=32, block_size=64, vocab_size=128, pos_encoding=pe,
                    kv_shift=kv_shift)
    cost = memory_plan.measure_block(cfg, bf16)
    from model import Block
    torch.manual_seed(0)
    block = Block(cfg)
    params = {p.untyped_storage().data_ptr() for p in block.parameters()}
    x = torch.randn(3, 200, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        got = memory_plan._saved_bytes(lambda: block(x, torch.arange(200)), params)
    assert got == cost.bytes(3, 200)


@pytest.mark.slow
@pytest.mark.parametrize("case", [0, 1], ids=lambda i: bench_memory.CASES[i][0])
def test_the_estimate_is_within_15_percent_of_a_measured_cpu_training(case):
    """Activations and peak against scripts/bench_memory.py's measurement (results/plan_vs_measured.md)."""
    name, config, overrides, micro_batch = bench_memory.CASES[case]
    estimate, measured = bench_memory.compare(config, overrides, micro_batch)
    print(f"{name}: activations {estimate.activations / measured['activations']:.3f}, "
          f"peak {estimate.peak / measured['peak']:.3f} (estimate / measured)")
    assert abs(estimate.activations / measured["activations"] - 1) <= 0.15
    assert abs(estimate.peak / measured["peak"] - 1) <= 0.15


def test_a_micro_batch_that_cannot_fit_is_refused_naming_the_numbers(byte_shards, tmp_path, capsys, monkeypatch):
    """The model state fits, its activations do not: refused before out_dir exists; memory_check=warn starts."""
    monkeypatch.setattr(memory_plan, "available_bytes", lambda device: (4 * 2 ** 20, "free on cuda:0 (fake)"))
    out = tmp_path / "run"  # model state 1.8 MiB, estimated peak 10.9 MiB
    status = train.main(train_args(byte_shards, out, "--max_steps=1", "--micro_batch_size=8"))
    err = capsys.readouterr().err
    assert status == 2, err
    assert err.startswith("error: the estimated peak ") and "micro-batch 8 x 64 tokens" in err
    assert "exceeds the 4.0 MiB free on cuda:0 (fake); lower micro_batch_size" in err
    assert not out.exists()
    status = train.main(train_args(byte_shards, out, "--max_steps=1", "--eval_interval=0", "--memory_check=warn"))
    assert status == 0 and "exceeds 4.0 MiB free on cuda:0 (fake)" in capsys.readouterr().out


def test_plan_prints_the_largest_micro_batch_that_fits(capsys):
    path = str(REPO / "configs" / "tiny" / "grape_ap.toml")
    # per GPU: model state 138 MiB (DDP), activations 210 MiB per sequence of 256 tokens (the 50,304-entry logits)
    assert plan.main([path, "--gpus", "2", "--gpu-memory", "1GiB", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "model state per GPU: weights 27.6 MiB, gradients 55.3 MiB, optimizer 55.3 MiB" in out  # DDP: 2 copies
    assert "micro-batch 8 x 1 accumulation steps (micro_batch_size=16)" in out and "DOES NOT FIT" in out
    assert "| 8 | 1 | 1.64 GiB | 1.78 GiB | no |" in out and "| 4 | 2 | 840.1 MiB | 978.2 MiB | yes |" in out
    assert "largest micro-batch that fits: 4 (--micro_batch_size=4)" in out
    assert "tokens per optimizer step: 4,096 (16 sequences x 256)" in out
    assert plan.main([path, "--gpus", "2", "--gpu-memory", "300MB", "--device", "cpu"]) == 0
    assert "no micro-batch fits" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [(["--gpu-memory", "lots"], "--gpu-memory must be a positive size"),
                                           (["--gpus", "0"], "argument --gpus: '0' is not a positive integer"),
                                           (["--gpus", "3"], "not divisible by the world size 3")])
def test_plan_names_a_bad_argument(args, message, capsys):
    """Exit status 2 and the problem named: from argparse (the flags) or as an `error:` line (the config)."""
    try:
        status = plan.main([str(REPO / "configs" / "tiny" / "rope.toml"), *args])
    except SystemExit as exit_info:
        status = exit_info.code
    assert status == 2 and message in capsys.readouterr().err
