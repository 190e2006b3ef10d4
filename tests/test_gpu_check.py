"""scripts/gpu_check.py on the CPU (--dry-run: tiny shapes, the same code up to the device): every section runs and
lands in the JSON and the markdown table, an existing result is not replaced without --force, bad arguments are
one error line with exit 2. On a CPU every additive PE takes the chunked path, so (a) compares it with itself;
the fused kernels' own correctness is tests/test_grape_ap_kernel.py and tests/test_attn_auto.py (interpreter)."""

import json
import subprocess
import sys

import pytest
import torch

from helpers import REPO


def gpu_check(*args, timeout=240):
    """The command in a child process (its watchdog ends the process at the limit)."""
    return subprocess.run([sys.executable, "-m", "scripts.gpu_check", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)


@pytest.mark.slow
def test_dry_run_end_to_end(tmp_path):
    out = tmp_path / "check"
    done = gpu_check(out, "--dry-run", "--minutes", "2", "--pes", "rope,grape_ap,grape_m+grape_ap")
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "gpu_check.json").read_text())
    assert results["environment"]["dry_run"] is True and results["skipped"] == []
    checked = {(r["pe"], r["dtype"]) for r in results["correctness"]}
    assert checked == {(pe, dtype) for pe in ("grape_ap", "grape_m+grape_ap") for dtype in ("float32", "bfloat16")}
    assert all(r["passed"] and r["path"] == "chunked" for r in results["correctness"])
    layers = {(r["pe"], r["impl"]): r for r in results["layer"]}
    assert set(layers) == {("rope", "chunked"), ("grape_ap", "auto"), ("grape_ap", "chunked")}
    assert all(r["time"] > 0 for r in layers.values())
    trained = {r["pe"]: r for r in results["model"]}
    assert set(trained) == {"rope", "grape_ap"}
    for r in trained.values():
        assert r["tokens_per_s"] > 0 and r["micro_batch"] == 2 and len(r["losses"]) == 2
    table = (out / "gpu_check.md").read_text()
    assert "| grape_ap | auto | chunked | 128 |" in table and table in done.stdout

    again = gpu_check(out, "--dry-run", "--sections", "correctness", "--pes", "grape_ap")
    assert again.returncode == 2 and "gpu_check.json exists" in again.stderr and "--force" in again.stderr
    assert json.loads((out / "gpu_check.json").read_text()) == results  # untouched


@pytest.mark.parametrize("args, message", [
    (["--sections", "speed"], "--sections 'speed': expected names among correctness,layer,model"),
    (["--minutes", "0"], "--minutes must be > 0"),
    pytest.param([], "no CUDA device here", marks=pytest.mark.skipif(torch.cuda.is_available(),
                                                                      reason="a GPU is here: the full check runs")),
])
def test_bad_arguments_are_one_error_line(tmp_path, capsys, args, message):
    """In this process: main() checks its arguments before the watchdog starts or anything is written."""
    from scripts import gpu_check as check

    status = check.main([str(tmp_path / "check"), *([] if args == [] else ["--dry-run"]), *args])
    err = capsys.readouterr().err
    assert status == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "check").exists()
