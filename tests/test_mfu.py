"""MFU: the PE-independent FLOP formula, the per-device peak table, n/a where no peak is known, and train.py's
log lines and metrics."""

import json

import pytest
import torch

import mfu
from helpers import REPO


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12), ("NVIDIA H200 NVL", 835e12), ("NVIDIA GH200 480GB", 989e12),
    ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA A100 80GB PCIe", 312e12), ("NVIDIA B200", 2250e12),
    ("NVIDIA GB200", 2500e12), ("NVIDIA L40S", 362e12), ("NVIDIA L40", 181e12), ("NVIDIA L4", 121e12),
    ("AMD Instinct MI300X", 1307e12), ("NVIDIA GeForce GTX 1080", None)])
def test_peak_by_device_name(monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    got, source = mfu.device_peak(torch.device("cuda", 0))
    assert got == peak and name in source
    assert mfu.device_peak(torch.device("cuda", 0), override=5e14)[0] == 5e14  # peak_flops wins


def test_no_peak_on_cpu_means_no_mfu():
    assert mfu.device_peak(torch.device("cpu")) == (None, "no peak known for cpu")
    assert mfu.utilisation(1e5, 1e9, None) is None and mfu.percent(None) == "n/a"
    assert mfu.percent(mfu.utilisation(1000.0, 6e9, 1e13)) == "60.0%"


def test_formula_is_6n_plus_attention_and_independent_of_the_encoding():
    from model import GPT, GPTConfig

    assert mfu.flops_per_token(1000, 2, 4, 32, 256) == 6 * 1000 + 12 * 2 * 4 * 32 * 256
    assert "= 6 x 1,000 + 12 x 2 x 4 x 32 x 256 = 792,432 " in mfu.formula(1000, 2, 4, 32, 256)
    shape = dict(n_layer=2, n_head=2, n_embd=64, head_dim=32, block_size=64, vocab_size=320)
    counts = {pe: GPT(GPTConfig(pos_encoding=pe, **shape)).num_params() for pe in ("rope", "alibi", "nope")}
    assert len(set(counts.values())) == 1  # no PE parameters: the same N, the same FLOPs per token


@pytest.mark.slow  # two trainings end to end
def test_train_prints_the_formula_and_mfu_na_on_cpu(byte_shards, tmp_path, capsys):
    import train
    from config import load_config

    def run(out, *extra):
        cfg = load_config(REPO / "configs" / "tiny" / "rope.toml",
                          [f"--data_dir={byte_shards}", f"--out_dir={out}", "--vocab_size=320", "--n_layer=1", "--block_size=32",
                           "--global_batch_size=2", "--micro_batch_size=2", "--max_steps=2", "--log_interval=1",
                           "--val_tokens=512", "--device=cpu", *extra])
        train.train(cfg)
        text = capsys.readouterr().out
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return text, [r for r in records if r["event"] == "train"], cfg

    text, logged, cfg = run(tmp_path / "auto")
    assert "MFU: FLOPs/token = 6N + 12·L·H·D·T = 6 x " in text and "peak unknown (no peak known for cpu): n/a" in text
    assert "| mfu n/a |" in text and all(r["mfu"] is None for r in logged)
    text, logged, cfg = run(tmp_path / "given", "--peak_flops=1e12")
    assert "peak 1 TFLOP/s per device (peak_flops from the config)" in text
    n = train.GPT(cfg.model).num_params()
    per_token = mfu.flops_per_token(n, 1, cfg.model.n_head, cfg.model.head_dim, 32)
    for r in logged:
        assert r["mfu"] == pytest.approx(r["tokens_per_s"] * per_token / 1e12, rel=1e-12)
