"""
Per-token losses without materialising (B, T, vocab) logits.

GPT.forward returns logits for every position only as one (B, T, V) fp32 tensor: 13 GB for a single 65,536-token
sequence with GPT-2's vocabulary. The model's last step is `lm_head(ln_f(x))`, so the output of `transformer.ln_f` is
captured with a forward hook during an ordinary forward (which then only projects the last position), and the LM head
is applied to slices of positions here. tests/test_eval_lm.py and tests/test_eval_long.py check the results against
`model(idx, all_logits=True)`, so a change to the model's head (e.g. logit soft-capping) cannot go unnoticed.
"""

from contextlib import contextmanager

import torch
import torch.nn.functional as F


@contextmanager
def final_hidden_states(model):
    """Within the block, `store["h"]` holds the (B, T, C) output of model.transformer.ln_f of the latest forward."""
    store = {}
    handle = model.transformer.ln_f.register_forward_hook(lambda m, i, out: store.__setitem__("h", out))
    try:
        yield store
    finally:
        handle.remove()


def head_logits(model, hidden):
    """fp32 logits of `hidden` (..., C) through the tied LM head, as GPT.forward computes them."""
    return model.lm_head(hidden).float()


@torch.no_grad()
def token_losses(model, x, y, chunk=4096):
    """(B, T) fp32 cross-entropy of predicting y from x (both (B, T) token ids), LM head applied `chunk` positions
    at a time."""
    with final_hidden_states(model) as store:
        model(x)
    hidden = store["h"]
    out = torch.empty(y.shape, dtype=torch.float32, device=y.device)
    for s in range(0, y.size(1), chunk):
        logits = head_logits(model, hidden[:, s:s + chunk])
        out[:, s:s + chunk] = F.cross_entropy(logits.flatten(0, 1), y[:, s:s + chunk].flatten(),
                                              reduction="none").view(y.size(0), -1)
    return out
