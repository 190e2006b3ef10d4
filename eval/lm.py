"""
A training checkpoint as an lm-evaluation-harness model, registered as "grape".

    lm = GrapeLM(checkpoint="out/medium_rope")                 # a ckpt_* dir, or a run dir = its newest checkpoint
    lm_eval.simple_evaluate(model=lm, tasks=[...])             # Python API (an instance: no registry needed)
    python -m eval.lm_eval --model grape --model_args checkpoint=out/medium_rope,batch_size=32 --tasks ...

Model arguments (also `--model_args key=value,...`):
    checkpoint   path (required unless `model=` is given in Python)
    device       auto (cuda if available) | cpu | cuda | cuda:N
    dtype        float32 (default: the reference harness ran fp32 weights without autocast) | bfloat16 (autocast
                 on CUDA, like training) | auto (bfloat16 on CUDA, float32 on CPU)
    batch_size   requests per forward (default 16; lm-eval's "auto" means the default here)
    max_length   tokens the model sees per forward; default block_size (the training length). Longer inputs are
                 left-truncated to it. PEs that extrapolate can be given more, e.g. max_length=8192.
    prefix_eot   true (default) | false: whether every request's context starts with EOT (50256)
    max_gen_toks default generation budget when a task does not set one (256)
    any GPTConfig field, e.g. rope_base=20000: a config override applied at load time (eval.load; the values are
                 read as train.py reads --key=value, config.parse_value)

Token layout (GPT-2 has no BOS; training documents are [EOT] + text, so EOT is what a document starts with):
    * loglikelihood(context, continuation): lm-eval's TemplateLM splits the pair (trailing spaces of the context move
      to the continuation; context + continuation is encoded jointly and split). With prefix_eot the context is
      [EOT] + tokens(context), as the model saw documents in training; an empty context is [EOT] either way (lm-eval's
      prefix token). prefix_eot=false matches lm-eval's `hf` model with its defaults on a GPT-2 tokenizer;
      prefix_eot=true matches `hf` with add_bos_token=True (tests/test_eval_hf_parity.py checks both).
    * loglikelihood_rolling(text): lm-eval's disjoint windows of max_length, the first conditioned on [EOT]; every
      text token is scored exactly once, EOT itself never (unlike `hf` with add_bos_token, which scores a BOS).
    * generate_until: [EOT] + context (if prefix_eot), left-truncated to max_length - max_gen_toks, then greedy
      decoding through the KV cache until a stop string, EOT, or max_gen_toks.
    * A literal "<|endoftext|>" in a request is encoded as the EOT token, as a Hugging Face GPT-2 tokenizer does.

Scoring, per batch of requests sorted by total length (longest first, so the first batch shows any OOM):
    input = (context + continuation)[-(max_length + 1):][:-1]   (left-truncation keeps the continuation whole)
    logits at the last len(continuation) input positions predict the continuation tokens; logprob = sum of their
    log-softmax entries, is_greedy = every continuation token is the argmax. Rows are right-padded; the model is
    causal, so padding never changes a row's logits. Only the scored positions go through the LM head: the hidden
    states are taken from the final norm (`transformer.ln_f`, whose output is what `lm_head` reads), which keeps
    memory at B x T x C instead of B x T x vocab (eval/scoring.py).
"""

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from config import BOOL_WORDS
from data.tokenizer import EOT, GPT2_N_VOCAB, gpt2_encoding
from eval.load import CheckpointError, load, model_overrides, ready
from eval.scoring import final_hidden_states, head_logits

EOT_TEXT = "<|endoftext|>"


def _as_bool(value):
    """A model argument that is not a config key (prefix_eot), read with config.parse_value's bool words."""
    if isinstance(value, bool):
        return value
    word = str(value).strip().lower()
    if word not in BOOL_WORDS:
        raise ValueError(f"expected true or false, got {value!r}")
    return BOOL_WORDS[word]


@register_model("grape")
class GrapeLM(TemplateLM):
    def __init__(self, checkpoint=None, model=None, device="auto", dtype="float32", batch_size=16, max_length=None,
                 prefix_eot=True, max_gen_toks=256, max_batch_size=None, overrides=None, **kwargs):
        super().__init__()
        # max_batch_size is accepted because lm-eval's CLI passes it to every model; batches here have a fixed size.
        # Any other keyword is a GPTConfig override; model_overrides names the valid keys if one is unknown.
        overrides = {**model_overrides(overrides), **model_overrides(kwargs)}
        if model is None:
            if checkpoint is None:
                raise ValueError("GrapeLM needs checkpoint=PATH (a ckpt_* or run directory) or model=<GPT>")
            loaded = load(checkpoint, overrides, device, dtype)
        else:
            if overrides:
                raise ValueError("config overrides need checkpoint=PATH (an in-memory model is used as it is)")
            loaded = ready(model, device, dtype)
        self.info = loaded.info
        if loaded.config.vocab_size < GPT2_N_VOCAB:
            raise CheckpointError(f"{self.info.get('path') or 'the model'}: vocab_size {loaded.config.vocab_size} "
                                  f"is smaller than GPT-2's {GPT2_N_VOCAB:,} tokens, so it was trained on another "
                                  f"tokenizer (e.g. data/fineweb_edu.py --tokenizer bytes); the tasks are scored "
                                  f"in GPT-2 tokens")
        self.model, self._device, self.amp = loaded.model, loaded.device, loaded.amp
        self.dtype = dtype
        self._batch_size = 16 if batch_size in (None, "auto") or str(batch_size).startswith("auto") else int(batch_size)
        self._max_length = int(max_length) if max_length else loaded.config.block_size
        self.prefix_eot = _as_bool(prefix_eot)
        self.max_gen_toks = int(max_gen_toks)
        self.tokenizer_enc = gpt2_encoding()

    # ---- lm-eval's interface ------------------------------------------------------------------------------------

    @property
    def eot_token_id(self):
        return EOT

    @property
    def prefix_token_id(self):
        return EOT  # conditions an empty context (and the first rolling window) in both prefix modes

    @property
    def max_length(self):
        return self._max_length

    @property
    def batch_size(self):
        return self._batch_size

    @property
    def device(self):
        return self._device

    @property
    def tokenizer_name(self):
        return "gpt2-tiktoken"

    def tok_encode(self, string, add_special_tokens=None, **kwargs):
        ids = self.tokenizer_enc.encode(string, allowed_special={EOT_TEXT})
        want_prefix = self.prefix_eot if add_special_tokens is None else bool(add_special_tokens) and self.prefix_eot
        if want_prefix and (not ids or ids[0] != EOT):
            ids = [EOT] + ids
        return ids

    def tok_decode(self, tokens, skip_special_tokens=False):
        if isinstance(tokens, int):
            tokens = [tokens]
        if skip_special_tokens:
            tokens = [t for t in tokens if t != EOT]
        return self.tokenizer_enc.decode(tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm=False, **kwargs):
        """requests: [((context, continuation) or None, context_tokens, continuation_tokens)] -> [(logprob, greedy)]."""
        collator = Collator(requests, sort_fn=lambda r: (-len(r[1]) - len(r[2]), tuple(r[1] + r[2])))
        results = []
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="loglikelihood")
        for chunk in collator.get_batched(n=self.batch_size):
            scored = self.score_tokens([(ctx, cont) for _, ctx, cont in chunk])
            for (key, _, _), answer in zip(chunk, scored):
                results.append(answer)
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, answer)
            bar.update(len(chunk))
        bar.close()
        return collator.get_original(results)

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        windows, owners = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            tokens = self.tok_encode(text, add_special_tokens=False)
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=tokens, prefix_token=EOT, max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owners.append(i)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owners, scores):
            totals[i] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm=False):
        out = []
        for req in tqdm(requests, disable=disable_tqdm, desc="generate_until"):
            context, gen_kwargs = req.args
            kw = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            if kw.get("do_sample"):
                raise NotImplementedError("GrapeLM.generate_until decodes greedily; the task asks for sampling "
                                          f"(gen_kwargs {gen_kwargs})")
            until = handle_stop_sequences(kw["until"], eos=EOT_TEXT)
            text = self.generate_greedy(context, until, kw["max_gen_toks"])
            self.cache_hook.add_partial("generate_until", req.args, text)
            out.append(text)
        return out

    # ---- computation --------------------------------------------------------------------------------------------

    @torch.no_grad()
    def score_tokens(self, pairs):
        """[(context_tokens, continuation_tokens)] -> [(sum of continuation log-probs, is_greedy)], one forward."""
        inputs, spans = [], []
        for ctx, cont in pairs:
            if not ctx or not cont:
                raise ValueError("a scored request needs at least one context and one continuation token")
            if len(cont) > self.max_length:
                raise ValueError(f"continuation of {len(cont)} tokens exceeds max_length={self.max_length}")
            inp = (ctx + cont)[-(self.max_length + 1):][:-1]
            inputs.append(inp)
            spans.append((len(inp) - len(cont), len(inp)))
        width = max(map(len, inputs))
        x = torch.zeros(len(inputs), width, dtype=torch.long)
        for row, inp in enumerate(inputs):
            x[row, :len(inp)] = torch.tensor(inp)
        with self.amp, final_hidden_states(self.model) as store:
            self.model(x.to(self.device))  # projects only the last position; the hook keeps every hidden state
            answers = []
            for row, ((start, end), (_, cont)) in enumerate(zip(spans, pairs)):
                logits = head_logits(self.model, store["h"][row, start:end])
                logp = F.log_softmax(logits, dim=-1)
                target = torch.tensor(cont, device=logp.device)
                total = logp.gather(-1, target[:, None]).sum().item()
                greedy = logp[:, :GPT2_N_VOCAB].argmax(-1)  # rows past 50256 pad the vocabulary, as in generation
                answers.append((total, bool((greedy == target).all())))
        return answers

    @torch.no_grad()
    def generate_greedy(self, context, until, max_gen_toks):
        """Greedy continuation of `context` through the KV cache, cut before the first stop string."""
        max_ctx = self.max_length - max_gen_toks
        if max_ctx <= 0:
            raise ValueError(f"max_gen_toks={max_gen_toks} leaves no room for a context in "
                             f"max_length={self.max_length}")
        ids = self.tok_encode(context)[-max_ctx:]
        cache = self.model.new_cache()
        generated = []
        x = torch.tensor([ids], device=self.device)
        with self.amp:
            for _ in range(max_gen_toks):
                logits, _ = self.model(x, cache=cache)
                next_id = int(logits[0, -1, :GPT2_N_VOCAB].argmax())  # rows past 50256 pad the vocabulary
                if next_id == EOT:
                    break
                generated.append(next_id)
                text = self.tokenizer_enc.decode(generated)
                if any(stop and stop in text for stop in until):
                    break
                x = torch.tensor([[next_id]], device=self.device)
        text = self.tokenizer_enc.decode(generated)
        for stop in until:
            if stop:
                text = text.split(stop)[0]
        return text
