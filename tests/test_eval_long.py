"""Long-context evaluation on a tiny checkpoint: per-token losses equal a direct forward, both protocols score each
token once, the extrapolation and passkey commands write their JSON and PNG, and the passkey scorer recognises a
correct answer."""

import json
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import eval.passkey as passkey
from checkpoint import save_model_only
from data import shards
from data.tokenizer import EOT, gpt2_encoding
from device import autocast_context
from eval import extrapolation
from eval.load import load
from eval.scoring import token_losses
from model import GPT, GPTConfig

TEXT = ("The history of the region is long and varied. Farmers settled the river valleys first, and towns grew "
        "along the trade routes that followed. ") * 40


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("long")
    torch.manual_seed(0)
    ckpts = [save_model_only(GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, head_dim=16, block_size=32,
                                           pos_encoding=pe)), root / pe, step=2) for pe in ("rope", "alibi")]
    data = root / "shards"
    data.mkdir()
    tokens = np.array([EOT] + gpt2_encoding().encode(TEXT), dtype=np.uint16)[:600]
    shards.write_shard(data / shards.shard_name("t", 0), tokens)
    return ckpts, data, tokens.astype(np.int64)


def test_token_losses_equal_direct_cross_entropy(setup):
    ckpts, _, tokens = setup
    model = load(ckpts[1], device="cpu").model
    x = torch.from_numpy(tokens[:97]).view(1, -1)
    logits, _ = model(x[:, :-1], x[:, 1:])
    direct = F.cross_entropy(logits[0], x[0, 1:], reduction="none")
    assert torch.allclose(token_losses(model, x[:, :-1], x[:, 1:], chunk=10)[0], direct, atol=1e-5)


def test_protocols_score_every_token_once(setup):
    ckpts, _, tokens = setup
    model = load(ckpts[0], device="cpu").model
    dev = torch.device("cpu")
    fp32 = autocast_context(dev, "float32")
    L, k = 64, 4
    span = tokens[:k * L + 1]
    per_pos, windows = extrapolation.nonoverlap(model, span, L, 3, dev, fp32)
    assert windows == k and per_pos.shape == (L,)
    x = torch.from_numpy(span[:-1]).view(k, L)
    y = torch.from_numpy(span[1:]).view(k, L)
    logits, _ = model(x, y)
    direct = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(k, L).mean(0)
    assert np.allclose(per_pos, direct.numpy(), atol=1e-5)
    # sliding with stride L on k whole windows is the same computation
    total, count = extrapolation.sliding(model, span, L, L, 2, dev, fp32)
    assert count == k * L and total / count == pytest.approx(float(per_pos.mean()), abs=1e-5)
    # any stride scores each of the n targets exactly once (sliding asserts the count)
    for stride in (5, 40):
        _, count = extrapolation.sliding(model, tokens[:101], L, stride, 8, dev, fp32)
        assert count == 100


def test_parse_length():
    assert extrapolation.parse_length("4x", 256) == 1024
    assert extrapolation.parse_length("0.5x", 256) == 128
    assert extrapolation.parse_length("300", 256) == 300


def test_extrapolation_cli_writes_json_and_png(setup, tmp_path, capsys):
    ckpts, data, _ = setup
    rc = extrapolation.main(["--checkpoint", str(ckpts[0]), str(ckpts[1]), str(ckpts[0]), "--label", "rope,alibi,r500",
                             "--override-for", "r500:rope_base=500", "--lengths", "1x,4x", "--tokens", "260",
                             "--stride", "0.5x", "--data-dir", str(data), "--batch-size", "4", "--out", str(tmp_path)])
    assert rc == 0, capsys.readouterr().err
    (json_path,) = tmp_path.glob("extrapolation_*.json")
    assert json_path.with_suffix(".png").stat().st_size > 10_000
    result = json.loads(json_path.read_text())
    assert [r["label"] for r in result["checkpoints"]] == ["rope", "alibi", "r500"]
    assert result["checkpoints"][2]["overrides"] == {"rope_base": 500.0}
    for run in result["checkpoints"]:
        assert sorted(map(int, run["nonoverlap"])) == [32, 128] == sorted(map(int, run["sliding"]))
        r = run["nonoverlap"]["128"]
        assert len(r["per_position"]) == 128 and len(r["per_block"]) == 4 and r["windows"] == 2
        assert r["ppl"] == pytest.approx(math.exp(r["loss"]))
    assert result["checkpoints"][0]["nonoverlap"]["128"]["loss"] != result["checkpoints"][2]["nonoverlap"]["128"]["loss"]
    assert "| rope |" in capsys.readouterr().out


def test_rope_scaling_variants_and_no_overwrite(setup, tmp_path, capsys):
    """--rope-scaling adds one evaluation per kind for RoPE-spectrum checkpoints (ALiBi is evaluated once), with the
    factor longest / training length; the scalings change the loss beyond the training length; a second run writes
    new files next to the first."""
    ckpts, data, _ = setup
    argv = ["--checkpoint", str(ckpts[0]), str(ckpts[1]), "--lengths", "1x,4x", "--tokens", "260", "--modes",
            "nonoverlap", "--data-dir", str(data), "--batch-size", "4", "--out", str(tmp_path), "--rope-scaling",
            "pi,yarn"]
    assert extrapolation.main(argv) == 0, capsys.readouterr().err
    (first,) = tmp_path.glob("extrapolation_*.json")
    runs = json.loads(first.read_text())["checkpoints"]
    assert [r["label"] for r in runs] == ["rope @ 2", "rope @ 2+pi", "rope @ 2+yarn", "alibi @ 2"]
    assert runs[2]["overrides"] == {"rope_scaling": "yarn", "rope_scaling_factor": 4.0}
    long = [r["nonoverlap"]["128"]["loss"] for r in runs[:3]]
    assert len(set(long)) == 3
    assert extrapolation.main(argv[:-2] + ["--rope-scaling", "longrope"]) == 2
    assert "unknown kind 'longrope'" in capsys.readouterr().err
    before = first.read_bytes()
    assert extrapolation.main(argv) == 0
    assert len(list(tmp_path.glob("extrapolation_*.json"))) == 2 and first.read_bytes() == before


def test_each_checkpoint_is_read_once_however_many_models_it_gives(setup, tmp_path, monkeypatch, capsys):
    """--rope-scaling builds three models from the RoPE checkpoint and one from ALiBi's: one meta.json read each."""
    import eval.load

    ckpts, data, _ = setup
    reads, read = [], eval.load.load_meta
    monkeypatch.setattr(eval.load, "load_meta", lambda path: reads.append(path) or read(path))
    assert extrapolation.main(["--checkpoint", str(ckpts[0]), str(ckpts[1]), "--lengths", "1x", "--tokens", "100",
                               "--modes", "nonoverlap", "--data-dir", str(data), "--out", str(tmp_path),
                               "--rope-scaling", "pi,yarn"]) == 0, capsys.readouterr().err
    (result,) = tmp_path.glob("extrapolation_*.json")
    assert len(json.loads(result.read_text())["checkpoints"]) == 4
    assert reads == ckpts


def test_missing_data_or_checkpoint_is_a_clear_error(setup, tmp_path, capsys):
    ckpts, data, _ = setup
    assert extrapolation.main(["--checkpoint", str(ckpts[0]), "--data-dir", str(tmp_path / "none")]) == 2
    assert "data directory not found" in capsys.readouterr().err
    assert extrapolation.main(["--checkpoint", str(ckpts[0]), "--data-dir", str(tmp_path)]) == 2
    assert "no val shards" in capsys.readouterr().err
    assert extrapolation.main(["--checkpoint", str(tmp_path / "nockpt"), "--data-dir", str(data)]) == 2
    assert "nockpt does not exist" in capsys.readouterr().err
    assert passkey.main(["--checkpoint", str(tmp_path / "nockpt")]) == 2
    assert "nockpt does not exist" in capsys.readouterr().err
    assert extrapolation.main(["--checkpoint", str(ckpts[0]), "--data-dir", str(data), "--tokens", "20",
                               "--lengths", "1x", "--modes", "sliding"]) == 2
    assert "hold no window of 33" in capsys.readouterr().err


def test_passkey_prompt_layout():
    enc = gpt2_encoding()
    for depth in (0.0, 0.5, 1.0):
        ids, copies = passkey.build_prompt(enc, "48213", 300, depth)
        assert len(ids) <= 300 and len(ids) > 300 - len(enc.encode(passkey.FILLER)) and ids[0] == EOT
        text = enc.decode(ids[1:])
        assert text.count("48213") == 2 and text.endswith(passkey.QUESTION)
        before = text.split(" The pass key is 48213")[0].count("The grass is green")
        assert before == round(depth * copies)
    with pytest.raises(ValueError, match="too short"):
        passkey.build_prompt(enc, "48213", 20, 0.5)
    assert passkey.first_number(" 48213. Remember") == "48213" and passkey.first_number(" none") is None


def test_passkey_cli_writes_json_and_png_and_scores_a_correct_answer(setup, tmp_path, monkeypatch, capsys):
    ckpts, _, _ = setup
    rc = passkey.main(["--checkpoint", str(ckpts[0]), "--lengths", "2x,4x", "--depths", "0,1", "--trials", "2",
                       "--out", str(tmp_path / "model")])
    assert rc == 0
    (json_path,) = (tmp_path / "model").glob("passkey_*.json")
    assert json_path.with_suffix(".png").stat().st_size > 5_000
    cells = json.loads(json_path.read_text())["checkpoints"][0]["cells"]
    assert [(c["length"], c["depth"]) for c in cells] == [(64, 0.0), (64, 1.0), (128, 0.0), (128, 1.0)]
    assert all(len(c["trials"]) == 2 and c["prompt_tokens"] <= c["length"] for c in cells)

    enc = gpt2_encoding()

    def oracle(model, prompts, device, amp, max_new_tokens=8):  # reads the key from the prompt
        return [enc.encode(" " + re.search(r"pass key is (\d+)", enc.decode(p[1:])).group(1) + ".") for p in prompts]

    monkeypatch.setattr(passkey, "greedy_continue", oracle)
    assert passkey.main(["--checkpoint", str(ckpts[0]), "--lengths", "2x", "--depths", "0.5", "--trials", "3",
                         "--out", str(tmp_path / "oracle")]) == 0
    (json_path,) = (tmp_path / "oracle").glob("passkey_*.json")
    assert json.loads(json_path.read_text())["checkpoints"][0]["cells"][0]["accuracy"] == 1.0
    assert "| 0.5 | 100 |" in capsys.readouterr().out
