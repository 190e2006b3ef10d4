"""scripts/bench_attention.py end to end at toy sizes: both tables and the JSON, every ratio against RoPE measured in
the same run, eager and compiled (--impls ...+compile). Timings are not asserted (the machine is shared); the
structure and the memory bookkeeping are."""

import json
import subprocess
import sys

import pytest

from helpers import REPO


@pytest.mark.slow
def test_bench_attention_writes_tables_and_json(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "scripts.bench_attention", "--seqlens", "64", "--dense-seqlens", "64",
           "--skip-model", "--n-embd", "32", "--n-head", "2", "--head-dim", "16", "--rounds", "1",
           "--pes", "rope,fox,grape_ap", "--threads", "1", "--impls", "chunked,dense,chunked+compile",
           "--json", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| fox | chunked |" in done.stdout and "| grape_ap | dense |" in done.stdout
    record = json.loads(out.read_text())
    assert record["meta"]["threads"] == 1
    rows = {(r["pe"], r["impl"], r["T"]): r for r in record["layer"]}
    compiled = {(pe, "chunked+compile", 64) for pe in ("rope", "fox", "grape_ap")}
    assert set(rows) == {("rope", "chunked", 64), ("fox", "chunked", 64), ("fox", "dense", 64),
                         ("grape_ap", "chunked", 64), ("grape_ap", "dense", 64)} | compiled
    assert "| rope | causal SDPA+compile |" in done.stdout and "| grape_ap | chunked+compile |" in done.stdout
    for key, r in rows.items():
        assert r["time"] > 0
        if key in compiled:  # memory is not measured for a compiled layer (its first step's peak is the compiler's)
            assert "mem" not in r
        else:
            assert r["peak_rss"] >= r["rss_before"] and r["mem"] == r["peak_rss"] - r["rss_before"]


def test_unknown_path_suffix_is_refused():
    from scripts.bench_attention import split_impl
    assert split_impl("chunked+compile") == ("chunked", True) and split_impl("auto") == ("auto", False)
    with pytest.raises(ValueError, match="unknown path 'chunked\\+fast'"):
        split_impl("chunked+fast")
