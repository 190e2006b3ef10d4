"""scripts/bench_inference.py: KV-cache accounting is exact and the command writes its table and JSON."""

import json

import torch

from model import GPT, GPTConfig
from scripts import bench_inference

SHAPE = dict(n_layer=2, n_head=2, n_embd=32, head_dim=16, block_size=32)


def test_cache_bytes_counts_keys_values_and_pe_features():
    B, T = 2, 10
    idx = torch.randint(0, 50257, (B, T))
    expected_kv = 2 * SHAPE["n_layer"] * B * T * SHAPE["n_head"] * SHAPE["head_dim"] * 4  # k and v, fp32
    per_pe = {"rope": 0,
              "fox": SHAPE["n_layer"] * B * SHAPE["n_head"] * T * 8,  # fp64 cumulative log forget gates per key
              "grape_ap": SHAPE["n_layer"] * B * SHAPE["n_head"] * T * 8 * 4,  # 8-dim fp32 rotated key probes
              "pope": expected_kv // 2}  # PoPE caches 2D-wide Cartesian keys: the K part doubles
    for pe, extra in per_pe.items():
        model = GPT(GPTConfig(**SHAPE, pos_encoding=pe)).eval()
        cache = model.new_cache()
        with torch.no_grad():
            model(idx, cache=cache)
        assert bench_inference.cache_bytes(cache) == expected_kv + extra, pe


def test_bench_cli_writes_table_and_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench_inference.main(["--pes", "rope,grape_ap", "--lengths", "8,16", "--decode-steps", "2",
                                 "--repeats", "1", "--device", "cpu", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["results"]) == {"rope", "grape_ap"}
    for row in result["results"].values():
        assert set(row) == {"8", "16"}
        assert all(r["prefill_ms"] > 0 and r["decode_ms_per_token"] > 0 for r in row.values())
        assert row["16"]["kv_bytes"] == 2 * row["8"]["kv_bytes"]
    text = capsys.readouterr().out
    assert "**prefill latency (ms)**" in text and "| grape_ap |" in text
    assert bench_inference.main(["--pes", "rope+nope", "--lengths", "8"]) == 2
