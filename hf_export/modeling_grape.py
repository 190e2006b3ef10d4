"""
A grape-pe GPT as a transformers causal LM (remote code; scripts/export_hf.py ships this file with
configuration_grape.py, model.py and chunked_attention.py, byte for byte the repository's):

    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32)
    model(input_ids).logits                       # (B, T, vocab) fp32, the logits of model.GPT
    model.generate(input_ids, attention_mask=mask, max_new_tokens=32)    # greedy or do_sample=True

The math is model.py's: GrapeForCausalLM holds a model.GPT as `model` (state-dict keys "model.transformer.h.0...",
the checkpoint's keys behind "model."); this file only translates between transformers' calling conventions and
GPT.forward(idx, cache=...). Every positional encoding and KV-shift work, with the decoding state model.KVCache
keeps for them (FoX's running log-forget sums, GRAPE-A/AP's key features, GRAPE-M-ctx's phase, KV-shift's last
projections).

Padding (attention_mask). model.GPT has no per-row positions: a row's tokens sit at positions 0, 1, ... of its own
sequence. So the real tokens of each row (mask 1) are run as that row's own sequence, padding removed, and their
logits put back at their columns; a masked column gets logits 0 and enters no cache. Rows with the same number of real
tokens run together, as one batch (they share every position): a batch without padding is one forward. With a
left-padded batch every row therefore gets exactly the logits, and under generate() exactly the tokens, it gets
alone. A mask with holes means what it means to transformers' own models: the masked tokens do not exist.

Cache (past_key_values). GrapeCache, not a transformers Cache: model.KVCache objects, one per group of rows of equal
history, created by the first forward with use_cache=True and returned as past_key_values; generate() hands it back
each step (generate creates no cache for this model: _supports_default_dynamic_cache is False). It knows how many
columns it has consumed (get_seq_length) and how many real tokens each row holds, and refuses an attention_mask whose
past columns disagree with that. Its state runs forward only (FoX, GRAPE-AP and KV-shift states cannot be rolled
back), so generate() is limited to greedy search and sampling (beam search and assisted decoding would need to
reorder or crop it) and the model declares itself stateful.

Precision: the weights' dtype is the computation's (dtype=torch.float32 reproduces the checkpoint's fp32 logits;
bfloat16 runs in bf16 like any transformers model, with model.py's fp32 islands: norms, rotations, PE features and
the logits). Constants that are no weights (ALiBi and GRAPE-A/AP slopes, GRAPE-M-mix's column index) are rebuilt
by the PE's own reset_parameters when transformers materialises the model.
"""

import torch
from transformers import GenerationMixin, PreTrainedModel
from transformers.generation import GenerationMode
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_grape import GrapeConfig

try:
    from .model import GPT, KVCache, PositionalEncoding
except ImportError:  # in the grape-pe repository model.py is a top-level module, beside this package
    from model import GPT, KVCache, PositionalEncoding


class GrapeCache:
    """The decoding state of a batch: groups [(rows, model.KVCache)], one per set of rows that hold the same number
    of real tokens (and so share every position), `columns` consumed so far (padding included: transformers'
    get_seq_length) and `lengths`, each row's real tokens (CPU, int64)."""

    is_compileable = False  # read by generate(): no static shapes here
    is_croppable = False  # the state of FoX, GRAPE-AP and KV-shift runs forward only

    def __init__(self, n_layer):
        self.n_layer = n_layer
        self.groups = None
        self.columns = 0
        self.lengths = None

    def get_seq_length(self, layer_idx=0):
        return self.columns

    def plan(self, counts):
        """The groups for a step that gives row b counts[b] new real tokens (a CPU int64 tensor), made at the first
        step; later steps must give every row of a group the same count."""
        if self.groups is None:
            self.groups = [(rows, KVCache(self.n_layer)) for rows in group_rows(counts)]
            self.lengths = torch.zeros_like(counts)
            return self.groups
        if counts.numel() != self.lengths.numel():
            raise ValueError(f"past_key_values holds {self.lengths.numel()} rows, the input has {counts.numel()}")
        for rows, _ in self.groups:
            if counts[rows].unique().numel() > 1:
                raise ValueError(f"rows {rows.tolist()} hold equally many tokens in past_key_values and run as one "
                                 f"batch, but attention_mask gives them {counts[rows].tolist()} new tokens; give "
                                 f"each row of a cached batch its tokens unmasked, or start a new cache")
        return self.groups


def group_rows(counts):
    """[rows (int64 tensor)] with equal counts, in order of first appearance."""
    return [torch.nonzero(counts == n).flatten() for n in dict.fromkeys(counts.tolist())]


class GrapeForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = GrapeConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]
    _tied_weights_keys = {"model.lm_head.weight": "model.transformer.wte.weight"}
    _is_stateful = True  # no assisted decoding: the cache cannot be cropped (see GrapeCache)
    _supported_generation_modes = (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE)
    _supports_context_parallel = False  # FoX, GRAPE-A/AP and GRAPE-M-ctx carry state along the whole sequence

    def __init__(self, config):
        super().__init__(config)
        self.model = GPT(config.gpt_config())
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls):
        return False  # past_key_values is a GrapeCache, made by forward

    def get_input_embeddings(self):
        return self.model.transformer.wte

    def get_output_embeddings(self):
        return self.model.lm_head

    @torch.no_grad()
    def _init_weights(self, module):
        """transformers calls this for every module whose tensors a checkpoint did not fill, and on a fresh model.
        GPT.__init__ has already drawn every parameter by the reference init (GPT.init_weights), so only the
        non-persistent buffers of a PE (constants no checkpoint holds) are set here: from a fresh instance of the
        same PE, i.e. by its own reset_parameters, leaving its parameters as loaded."""
        if not isinstance(module, PositionalEncoding):
            return
        saved = module.state_dict(keep_vars=True)
        constants = {name: b for name, b in module.named_buffers(recurse=False) if name not in saved}
        if not constants:
            return
        with torch.device("cpu"):
            fresh = type(module)(self.model.config)
        fresh.reset_parameters()
        for name, buffer in constants.items():
            buffer.copy_(getattr(fresh, name))

    def forward(self, input_ids=None, attention_mask=None, past_key_values=None, labels=None, use_cache=None,
                logits_to_keep=0, return_dict=None, inputs_embeds=None, output_attentions=None,
                output_hidden_states=None, num_items_in_batch=None, **kwargs):
        """input_ids (B, T); attention_mask (B, past + T) of 0/1 or None; past_key_values a GrapeCache or None;
        use_cache (default: whether past_key_values was given) returns the cache; logits_to_keep k > 0 returns the
        logits of the last k columns only. labels (B, T): transformers' shifted causal-LM loss (-100 ignored)."""
        unsupported = {name: value for name, value in kwargs.items() if value is not None}
        if inputs_embeds is not None:
            unsupported["inputs_embeds"] = "a tensor"
        if unsupported:
            raise TypeError(f"{type(self).__name__}.forward takes input_ids, attention_mask, past_key_values, "
                            f"labels, use_cache, logits_to_keep; not {sorted(unsupported)} (positions follow from "
                            f"the attention mask and the cache)")
        if output_attentions or output_hidden_states:
            raise ValueError(f"{type(self).__name__} does not return attentions or hidden states")
        if input_ids is None or input_ids.dim() != 2:
            raise ValueError(f"input_ids must be a (batch, length) tensor, got "
                             f"{None if input_ids is None else tuple(input_ids.shape)}")
        if past_key_values is not None and not isinstance(past_key_values, GrapeCache):
            raise TypeError(f"past_key_values must be the GrapeCache this model returned, got "
                            f"{type(past_key_values).__name__}")
        use_cache = past_key_values is not None if use_cache is None else use_cache
        cache = past_key_values if past_key_values is not None else (GrapeCache(self.model.config.n_layer) if use_cache else None)
        keep = logits_to_keep if isinstance(logits_to_keep, int) else None
        if keep is None:
            raise TypeError(f"logits_to_keep must be an int, got {type(logits_to_keep).__name__}")
        logits = self._logits(input_ids, attention_mask, cache, keep)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, vocab_size=logits.size(-1), num_items_in_batch=num_items_in_batch)
        out = CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache if use_cache else None)
        return out if return_dict is not False else out.to_tuple()

    def _logits(self, input_ids, attention_mask, cache, keep):
        """(B, K, V) fp32 logits of the last K columns (K = T for keep 0, else min(keep, T)); see the module
        docstring for padding."""
        B, T = input_ids.shape
        past = cache.columns if cache is not None else 0
        real = None  # (B, T) bool: which new columns hold tokens; None: all of them
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (B, past + T):
                raise ValueError(f"attention_mask must be (batch, past + new) = ({B}, {past} + {T}), got "
                                 f"{tuple(attention_mask.shape)}")
            mask = attention_mask.bool()
            if cache is not None and cache.lengths is not None:
                held = mask[:, :past].sum(1).cpu()
                if not torch.equal(held, cache.lengths):
                    raise ValueError(f"attention_mask's first {past} columns mark {held.tolist()} real tokens per "
                                     f"row, past_key_values holds {cache.lengths.tolist()}")
            real = None if mask[:, past:].all() else mask[:, past:]
        counts = torch.full((B,), T, dtype=torch.long) if real is None else real.sum(1).cpu()
        groups = cache.plan(counts) if cache is not None else [(rows, None) for rows in group_rows(counts)]
        only_last = keep == 1 or T == 1
        if real is None and len(groups) == 1:  # no padding, one history: one forward, nothing to place
            logits, _ = self.model(input_ids, cache=groups[0][1], all_logits=not only_last)
        else:
            logits = self._placed(input_ids, real, counts, groups, only_last)
        if cache is not None:
            cache.columns += T
            cache.lengths += counts
        return logits if keep == 0 else logits[:, -keep:]

    def _placed(self, input_ids, real, counts, groups, only_last):
        """Each group's real tokens run as its own batch; their logits at their columns of a (B, T or 1, V) tensor
        of zeros (only_last: the last column, which holds a row's last real token when that column is real)."""
        B, T = input_ids.shape
        out = None
        for rows, kv in groups:
            n = int(counts[rows[0]])
            if n == 0:
                continue
            rows = rows.to(input_ids.device)
            sel = None if real is None else real[rows]
            ids = input_ids[rows] if sel is None else input_ids[rows][sel].view(len(rows), n)
            logits, _ = self.model(ids, cache=kv, all_logits=not only_last)
            if out is None:
                out = logits.new_zeros(B, 1 if only_last else T, logits.size(-1))
            if only_last:
                last = torch.ones_like(rows, dtype=torch.bool) if sel is None else sel[:, -1]
                out[rows[last], 0] = logits[last, -1]
            elif sel is None:
                out[rows] = logits
            else:
                placed = logits.new_zeros(len(rows), T, logits.size(-1))
                placed[sel] = logits.reshape(-1, logits.size(-1))
                out[rows] = placed
        if out is None:  # no row has a token in this step
            out = torch.zeros(B, 1 if only_last else T, self.model.config.vocab_size, device=input_ids.device,
                              dtype=torch.promote_types(self.dtype, torch.float32))
        return out
