"""scripts/export_hf.py's built-in mappings: the exported transformers model computes our logits (Qwen3 for QK-norm
before rotation, Llama without QK-norm, SmolLM3 for NoPE), the tokenizer encodes like tiktoken's GPT-2, and a
configuration without an exact built-in class gets the reason, and the remote-code export instead
(tests/test_export_remote.py tests that one)."""

import json

import pytest
import torch

from checkpoint import save_model_only
from data.tokenizer import gpt2_encoding
from model import GPT, GPTConfig
from scripts import export_hf

TINY = dict(n_layer=2, n_head=2, n_embd=64, head_dim=32, block_size=64, rope_base=500.0)


def random_model(**kw):
    """A tiny model whose every norm gain is random: a swapped or missing gain changes the logits."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**TINY, **kw}))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.normal_(1.0, 0.3)
    return model.eval()


@pytest.mark.parametrize("kw, arch", [
    (dict(pos_encoding="rope", qk_norm_before_rotary=True), "Qwen3ForCausalLM"),
    (dict(pos_encoding="rope", qk_norm=False), "LlamaForCausalLM"),
    (dict(pos_encoding="nope", qk_norm=False), "SmolLM3ForCausalLM"),
])
def test_exported_model_has_our_logits(tmp_path, kw, arch):
    from transformers import AutoModelForCausalLM

    model = random_model(**kw)
    ckpt = save_model_only(model, tmp_path / "run", step=3)
    out, got_arch, diff = export_hf.export(ckpt, tmp_path / "hf")
    assert got_arch == arch and diff < 1e-4
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf).__name__ == arch and hf.config.tie_word_embeddings and hf.config.vocab_size == 50304
    idx = torch.randint(0, 50257, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, _ = model(idx, all_logits=True)
        theirs = hf(input_ids=idx).logits
    assert (ours - theirs).abs().max().item() < 1e-4
    info = json.loads((out / "export_info.json").read_text())
    assert info["step"] == 3 and info["architecture"] == [arch]
    with pytest.raises(export_hf.ExportError, match="not empty"):  # an earlier export is never overwritten silently
        export_hf.export(ckpt, out)
    export_hf.export(ckpt, out, force=True)


def test_rotation_sign_fix_is_needed():
    """Without negating the second halves of W_q, W_k the RoPE logits differ (so the parity above is not vacuous)."""
    model = random_model(pos_encoding="rope", qk_norm=False)
    hf = export_hf.to_hf(model)
    sd = export_hf.hf_state_dict(model, "LlamaForCausalLM")
    for i in range(model.config.n_layer):
        for name in ("q_proj", "k_proj"):
            key = f"model.layers.{i}.self_attn.{name}.weight"
            sd[key] = model.state_dict()[f"transformer.h.{i}.attn.c_{name[0]}.weight"]
    hf.load_state_dict(sd, strict=False)
    assert export_hf.max_logit_difference(model, hf) > 1e-3


def test_tokenizer_matches_tiktoken(tmp_path):
    from transformers import AutoTokenizer

    export_hf.gpt2_tokenizer(64).save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    enc = gpt2_encoding()
    for text in ["Question: Which gas do plants take in?\nAnswer: carbon dioxide", "  spaces,\n\n\ttabs  ",
                 "Ünïcödé 你好 3.14159 it's <|endoftext|> done"]:
        assert tok.encode(text) == enc.encode(text, allowed_special={"<|endoftext|>"})
    assert tok.eos_token_id == tok.bos_token_id == tok.pad_token_id == 50256


@pytest.mark.parametrize("kw, match", [
    (dict(pos_encoding="rope"), "reference order"),
    (dict(pos_encoding="nope"), "NoPE with QK-norm"),
    (dict(pos_encoding="alibi"), "alibi"),
    (dict(pos_encoding="rope", qk_norm=False, kv_shift=True), "kv_shift"),
])
def test_unexportable_configs_are_refused(kw, match):
    with pytest.raises(export_hf.ExportError, match=match):
        export_hf.architecture(GPTConfig(**{**TINY, **kw}))


def test_cli_exports_remote_code_where_no_builtin_class_is_exact(tmp_path, capsys):
    """The reference order (rotate, then normalise) has no built-in class: the CLI exports it as remote code and
    says why on the card; --remote-code does the same for a configuration that has one."""
    ckpt = save_model_only(random_model(pos_encoding="rope"), tmp_path / "run")
    assert export_hf.main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "hf")]) == 0
    assert "wrote GrapeForCausalLM" in capsys.readouterr().out
    info = json.loads((tmp_path / "hf" / "export_info.json").read_text())
    assert info["remote_code"] and "reference order" in info["why_remote_code"]
    assert "reference order" in (tmp_path / "hf" / "README.md").read_text()
    qwen3 = save_model_only(random_model(pos_encoding="rope", qk_norm_before_rotary=True), tmp_path / "run_qwen3")
    assert export_hf.main(["--checkpoint", str(qwen3), "--out", str(tmp_path / "hf_builtin")]) == 0
    assert "wrote Qwen3ForCausalLM" in capsys.readouterr().out
    assert export_hf.main(["--checkpoint", str(qwen3), "--out", str(tmp_path / "hf_remote"), "--remote-code"]) == 0
    assert "wrote GrapeForCausalLM" in capsys.readouterr().out
