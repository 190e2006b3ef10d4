"""
The model card (README.md) of an exported checkpoint, from what the checkpoint and its run directory hold; nothing is
recomputed and nothing is estimated.

    card = model_card(CardFacts(...))      # scripts/export_hf.py fills CardFacts

Sections:
    front matter        library_name, tags, license-free (the card states no license: the checkpoint's owner adds it)
    Model               the positional encoding (sweeps.tables' label and the pos_encoding name), parameters (the
                        tied embedding counted once), shape, training length, vocabulary, step and tokens trained,
                        saved dtype, the transformers class and why (built-in mapping or remote code)
    Positional encoding model.py's own description of each PE it uses (the class docstrings: formula and paper), so
                        the card says what the code computes
    Results             the validation loss logged at this checkpoint's step (metrics.jsonl), the zero-shot tables of
                        eval/zero_shot.py for this step (eval/<ckpt>_zero_shot_*.json, eval.zero_shot.markdown) and
                        the extrapolation losses (eval/extrapolation_*.json) for this checkpoint, each only when the
                        run has it (sweeps.results.read_run picks the newest); otherwise the card says none is recorded
    Training            the resolved config of meta.json
    How to use          from_pretrained and lm-eval's `hf` model, with trust_remote_code where the export needs it
This module is part of the export tooling, not of the shipped model code.
"""

import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path

from model import PE_CLASSES, ShiftLinear, split_pos_encoding
from sweeps.results import extrapolation_losses, read_run
from sweeps.tables import pe_label

NOPE = ("NoPE: no positional signal; a causal decoder infers order from its mask alone (Haviv et al., 2022, "
        "arXiv 2203.16634; Kazemnejad et al., 2023, arXiv 2305.19466).")


@dataclass
class CardFacts:
    name: str  # the run's name (the checkpoint's run directory)
    checkpoint: str  # the checkpoint directory exported
    step: int | None
    tokens: int | None
    config: dict  # meta.json's resolved config (model and training keys)
    num_params: int
    architecture: str  # the transformers class
    remote_code: bool
    why_remote: str | None  # why no built-in class is exact (None when the user asked for remote code)
    dtype: str  # of the saved weights
    tokenizer: str | None  # "gpt2", or None when no tokenizer is saved
    token_note: str  # how token ids map to text
    load_path: str  # what from_pretrained is given in the examples (a Hub repo id or the folder)
    git: str | None = None
    results: dict = field(default_factory=dict)  # run_results()


def run_results(checkpoint, step):
    """{val_loss: (step, loss) | None, zero_shot: record | None, extrapolation: entry | None} of the run directory
    holding `checkpoint`, for `step`; all None when it is not a train.py run directory."""
    run_dir = Path(checkpoint).parent
    found = dict(val_loss=None, zero_shot=None, extrapolation=None)
    if not ((run_dir / "config.json").is_file() and (run_dir / "metrics.jsonl").is_file()):
        return found
    run = read_run(run_dir)
    at_step = [v for v in run.val if step is None or v["step"] == step]
    if at_step:
        found["val_loss"] = (at_step[-1]["step"], at_step[-1]["val_loss"])
    if run.zero_shot and run.zero_shot.get("step") == step:
        found["zero_shot"] = run.zero_shot
    entry = run.extrapolation
    if entry and Path(entry["path"]).resolve() == Path(checkpoint).resolve() and not entry.get("overrides"):
        found["extrapolation"] = entry
    return found


def pe_descriptions(config):
    """model.py's docstring of each PE the config uses (and of KV-shift), as (title, text) pairs."""
    rotary, additive = split_pos_encoding(config["pos_encoding"])
    parts = [(name, inspect.cleandoc(PE_CLASSES[name].__doc__)) for name in (rotary, additive) if name]
    if not parts:
        parts.append(("nope", NOPE))
    if config.get("kv_shift"):
        parts.append(("kv_shift", inspect.cleandoc(ShiftLinear.__doc__)))
    return parts


def _results_section(facts):
    from eval.zero_shot import markdown as zero_shot_markdown

    res = facts.results
    lines = ["## Results", ""]
    if res.get("val_loss"):
        step, loss = res["val_loss"]
        lines += [f"Validation loss at step {step:,} (train.py's held-out shard, metrics.jsonl): **{loss:.4f}** "
                  f"(nats per token).", ""]
    else:
        lines += ["No validation loss is recorded for this checkpoint's step.", ""]
    if res.get("zero_shot"):
        lines += ["Zero-shot (lm-evaluation-harness through eval/zero_shot.py, this checkpoint):", "",
                  zero_shot_markdown([res["zero_shot"]])]
    else:
        lines += ["No zero-shot evaluation is recorded for this checkpoint.", ""]
    entry = res.get("extrapolation")
    losses = extrapolation_losses(entry, "nonoverlap") if entry else {}
    if losses:
        lines += ["Loss by evaluation length (eval/extrapolation.py, non-overlapping windows):", "",
                  "| tokens | " + " | ".join(f"{L:,}" for L in sorted(losses)) + " |",
                  "|---" * (len(losses) + 1) + "|",
                  "| loss | " + " | ".join(f"{losses[L]:.4f}" for L in sorted(losses)) + " |", ""]
    return lines


def _usage_section(facts):
    trust = ", trust_remote_code=True" if facts.remote_code else ""
    lines = ["## How to use", "", "```python", "import torch", "from transformers import AutoModelForCausalLM" +
             (", AutoTokenizer" if facts.tokenizer else ""), "",
             f"model = AutoModelForCausalLM.from_pretrained(\"{facts.load_path}\"{trust}, dtype=torch.float32)"]
    if facts.tokenizer:
        lines += [f"tokenizer = AutoTokenizer.from_pretrained(\"{facts.load_path}\"{trust})",
                  "ids = tokenizer(\"The history of science\", return_tensors=\"pt\")",
                  "out = model.generate(**ids, max_new_tokens=32, do_sample=False)",
                  "print(tokenizer.decode(out[0]))"]
    else:
        lines += ["ids = torch.tensor([[256, 84, 104, 101]])  # token ids: see the note below",
                  "out = model.generate(ids, max_new_tokens=32, do_sample=False)"]
    lines += ["```", "", facts.token_note, ""]
    if facts.remote_code:
        lines += ["`trust_remote_code=True` runs the files shipped here: `model.py` and `chunked_attention.py` (the "
                  "grape-pe model code, unchanged) and the thin wrapper `configuration_grape.py` / "
                  "`modeling_grape.py`. They need only `torch` and `transformers`. Batched generation takes a "
                  "left-padded batch with its attention mask; each row gets exactly the tokens it gets alone. "
                  "Greedy search and sampling are supported (no beam search).", ""]
    if facts.tokenizer:
        lines += ["Zero-shot evaluation with lm-evaluation-harness's own `hf` model:", "", "```bash",
                  f"lm_eval --model hf --model_args pretrained={facts.load_path}{',trust_remote_code=True' if facts.remote_code else ''},"
                  f"dtype=float32 --tasks arc_easy,piqa --batch_size 16", "```", ""]
    return lines


def model_card(facts):
    """The README.md text for an export described by `facts`."""
    cfg = facts.config
    label = pe_label(cfg)
    pe = cfg["pos_encoding"] + (" + kv_shift" if cfg.get("kv_shift") else "")
    how = (f"`{facts.architecture}`, remote code shipped in this folder" +
           (f" (no transformers architecture computes this model: {facts.why_remote})" if facts.why_remote else "")
           if facts.remote_code else f"`{facts.architecture}`, built into transformers (an exact mapping of the "
                                     f"weights; see export_info.json)")
    vocab = cfg["vocab_size"]
    lines = ["---", "library_name: transformers", "tags:", "- grape-pe", "- positional-encoding",
             f"- {cfg['pos_encoding']}", "---", "",
             f"# {facts.name}: a {label} language model", "",
             f"A decoder-only transformer (grape-pe's GPT: RMSNorm, SwiGLU, QK-norm, tied embedding, no biases) "
             f"trained with the {label} positional encoding.", "",
             "## Model", "", "| | |", "|---|---|",
             f"| positional encoding | {label} (`pos_encoding = \"{cfg['pos_encoding']}\"`"
             f"{', `kv_shift = true`' if cfg.get('kv_shift') else ''}) |",
             f"| parameters | {facts.num_params:,} (the tied embedding counted once) |",
             f"| layers, heads x head dim, width | {cfg['n_layer']}, {cfg['n_head']} x {cfg['head_dim']}, "
             f"{cfg['n_embd']} |",
             f"| training context | {cfg['block_size']:,} tokens |",
             f"| vocabulary | {vocab:,} embedding rows |",
             f"| trained | step {facts.step if facts.step is not None else '?'}, "
             f"{facts.tokens:,} tokens |" if facts.tokens is not None else
             f"| trained | step {facts.step if facts.step is not None else '?'}, tokens not recorded |",
             f"| weights | {facts.dtype} (safetensors) |",
             f"| transformers class | {how} |", "",
             "## Positional encoding", "",
             f"As model.py describes it ({pe}):", ""]
    for name, text in pe_descriptions(cfg):
        lines += [f"`{name}`:", "", "```text", text, "```", ""]
    lines += _results_section(facts)
    lines += ["## Training configuration", "",
              f"The resolved config stored with the checkpoint ({Path(facts.checkpoint).name}/meta.json"
              f"{f', git {facts.git}' if facts.git else ''}):", "",
              "<details><summary>config</summary>", "", "```json", json.dumps(cfg, indent=1, sort_keys=True), "```",
              "", "</details>", ""]
    lines += _usage_section(facts)
    return "\n".join(lines)
