"""memory_plan.py: the model-state formula against the tensors a training step really holds, and train.py's start-up
refusal of a model whose state cannot fit the device's memory (before anything is written into out_dir)."""

import pytest
import torch

import memory_plan
import train
from helpers import train_args
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
    assert err.startswith("error: the model state ") and "exceeds the 0.05 GiB free on cuda:0 (fake)" in err
    assert "parameters: fp32 weights, gradients and AdamW moments, one process" in err
    assert not out.exists()


def test_the_start_up_line_names_the_estimate_and_the_memory(byte_shards, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(memory_plan, "available_bytes", lambda device: (None, "unknown for device type x"))
    train.main(train_args(byte_shards, tmp_path / "run", "--max_steps=1", "--eval_interval=0"))
    out = capsys.readouterr().out
    assert "memory: model state 0.00 GiB per process (" in out and "not checked" in out
