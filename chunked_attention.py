"""
Exact causal softmax attention with an additive logit bias, one block of queries at a time, so that nothing of size
T x T is ever held: neither in the forward, nor saved for the backward, nor built in the backward.

    out_i = sum_{j <= pos(i)} softmax_j(s_ij) v_j,    s_ij = <q_i, k_j> / sqrt(D) + b(i, j)

The bias b comes from an additive PE's `bias(q_feats, k_feats, q_pos, k_pos)` (model.py), called on slices of the
per-token features; this module knows no PE formula. Keys sit at positions 0 .. Tk-1 and the queries are the last
Tq of them (q_pos = Tk-Tq .. Tk-1), as in training (Tq = Tk) and in cached decoding.

Forward, for each block of c = `chunk` consecutive queries [s, e):
    kend = Tk - Tq + e                         the block's last query sees keys 0 .. kend-1, so no later key is read
    b    = bias(q_feats[s:e], k_feats[:kend])  (B|1, H, c, kend) fp32; only its last c columns can lie above the
                                               diagonal, so only that c x c corner gets -inf
    out[s:e] = SDPA(q[s:e], k[:kend], v[:kend], attn_mask = b in q's dtype)   (CPU: fused flash kernel)
Saved for the backward: q, k, v, out, the features and nothing per block, i.e. O(B H T D).
Backward, per block, recomputing instead of storing:
    b again, with autograd on (so the PE's own formula differentiates itself, parameters included)
    P   = softmax(q k^T / sqrt(D) + b)         fp32
    dV += P^T dO,   dS = P * (dO V^T - delta), delta_i = <dO_i, out_i>   (the softmax backward)
    dQ  = dS K / sqrt(D),   dK += dS^T Q / sqrt(D),   d(features, PE parameters) = vector-Jacobian product of b at dS
Peak extra memory is a handful of (B, H, c, T) fp32 tensors; the work is that of causal attention (keys past a
block's end are never touched) plus the bias, built twice (forward and backward).

Numerics: the bias is computed in fp32 by the PE and handed to SDPA in q's dtype (bf16 under autocast, as in the
dense path and the reference code); the backward recomputes S and P in fp32 from the same rounded bias and
accumulates dK, dV in fp32 (on CUDA its products run as TF32 where allowed, as train.py does; bf16 q, k, v are
exact in TF32). The PE's bias is recomputed under the autocast state of the forward, so that both passes
differentiate the same function. Per block, a bias of the form c_i - c_j can be re-centred on the block (FoX does),
which makes it more accurate than one T x T subtraction.

Cost: the same matrix products as causal attention, plus a few elementwise passes over each block's (c, kend)
bias and probabilities; the block size trades those passes' cache footprint against per-block overhead (128 is
the default). Where a fused kernel can take the bias, it is faster: flex_pairwise_attention below, for the
separable biases on CUDA.
"""

import functools
import math

import torch
import torch.nn.functional as F


def chunked_bias_attention(q, k, v, q_feats, k_feats, bias_fn, params=(), chunk=128, scale=None):
    """q (B, H, Tq, D), k (B, H, Tk, D), v (B, H, Tk, Dv); q_feats / k_feats: dicts of per-token tensors laid out
    (B, H, T, ...); bias_fn(q_feats, k_feats, q_pos, k_pos) -> (B|1, H, Tq', Tk') fp32; params: the tensors bias_fn
    reads that need gradients (a PE's parameters); scale: the logit scale (default 1/sqrt(D)). Returns (B, H, Tq, Dv)
    in q's dtype."""
    q_names, k_names = tuple(q_feats), tuple(k_feats)
    scale = 1.0 / math.sqrt(q.size(-1)) if scale is None else float(scale)
    distinct, slots = _distinct((*q_feats.values(), *k_feats.values()))
    return _ChunkedBiasAttention.apply(bias_fn, int(chunk), scale, q_names, k_names, slots, q, k, v, *distinct,
                                       *params)


def _distinct(tensors):
    """(the distinct tensors among `tensors` in first-seen order, and for each entry of `tensors` its index among
    them). A tensor that is both a query and a key feature (FoX's running sum) enters the autograd Function once:
    torch.compile cannot trace a Function that receives one tensor in two inputs."""
    distinct, slots = [], []
    for t in tensors:
        slot = next((i for i, d in enumerate(distinct) if d is t), len(distinct))
        if slot == len(distinct):
            distinct.append(t)
        slots.append(slot)
    return distinct, tuple(slots)


def _blocks(Tq, Tk, chunk):
    """(s, e, kend) for each query block: rows s..e-1 of the queries, keys 0..kend-1."""
    for s in range(0, Tq, chunk):
        e = min(s + chunk, Tq)
        yield s, e, Tk - Tq + e


def _above_diagonal(chunk, dtype, device):
    """-inf on the strict upper triangle of a chunk x chunk block (key after query), 0 elsewhere; added to the last
    columns of a block's logits (sliced for a shorter last block). Adding is cheaper than masked_fill on a view."""
    return torch.full((chunk, chunk), float("-inf"), dtype=dtype, device=device).triu_(1)


def _positions(Tq, Tk, device):
    return torch.arange(Tk - Tq, Tk, device=device), torch.arange(Tk, device=device)


def _block_bias(bias_fn, q_feats, k_feats, q_pos, k_pos, s, e, kend):
    qf = {n: t[:, :, s:e] for n, t in q_feats.items()}
    kf = {n: t[:, :, :kend] for n, t in k_feats.items()}
    return bias_fn(qf, kf, q_pos[s:e], k_pos[:kend])


class _ChunkedBiasAttention(torch.autograd.Function):

    @staticmethod
    def forward(ctx, bias_fn, chunk, scale, q_names, k_names, slots, q, k, v, *tensors):
        """tensors: the distinct feature tensors, then the parameters; feature n of q_names + k_names is
        tensors[slots[n]]."""
        B, H, Tq, D = q.shape
        Tk = k.size(2)
        feats = [tensors[i] for i in slots]
        q_feats = dict(zip(q_names, feats[:len(q_names)]))
        k_feats = dict(zip(k_names, feats[len(q_names):]))
        q_pos, k_pos = _positions(Tq, Tk, q.device)
        above = _above_diagonal(min(chunk, Tq), q.dtype, q.device)
        out = torch.empty(B, H, Tq, v.size(-1), dtype=q.dtype, device=q.device)
        for s, e, kend in _blocks(Tq, Tk, chunk):
            c = e - s
            # a fresh fp32 bias becomes the mask in place; a bf16 mask is a new tensor anyway
            mask = _block_bias(bias_fn, q_feats, k_feats, q_pos, k_pos, s, e, kend).to(q.dtype).contiguous()
            mask[..., kend - c:] += above[:c, :c]
            out[:, :, s:e] = F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, :kend], v[:, :, :kend],
                                                            attn_mask=mask, scale=scale)
        ctx.bias_fn, ctx.chunk, ctx.scale, ctx.q_names, ctx.k_names = bias_fn, chunk, scale, q_names, k_names
        ctx.slots = slots
        device_type = q.device.type
        ctx.autocast = (device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        ctx.save_for_backward(q, k, v, out, *tensors)
        return out

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, out, *tensors = ctx.saved_tensors
        nq, nk, slots = len(ctx.q_names), len(ctx.k_names), ctx.slots
        n_distinct = max(slots) + 1 if slots else 0
        feats = tuple(tensors[i] for i in slots)
        params = tuple(tensors[n_distinct:])
        B, H, Tq, D = q.shape
        Tk, Dv = k.size(2), v.size(-1)
        scale = ctx.scale
        device_type, autocast_on, autocast_dtype = ctx.autocast
        q_pos, k_pos = _positions(Tq, Tk, q.device)
        above = _above_diagonal(min(ctx.chunk, Tq), torch.float32, q.device)

        # fp32 (B*H, T, D) copies: O(T), and they make every per-block product a plain batched matmul
        as3 = lambda t: t.float().reshape(B * H, t.size(2), t.size(3))
        q3, k3, v3, do3 = as3(q) * scale, as3(k), as3(v), as3(d_out)
        delta = (do3 * as3(out)).sum(-1, keepdim=True)  # (B*H, Tq, 1): rowsum(P * dP) of the softmax backward
        dq3 = torch.empty_like(q3)
        dk3 = torch.zeros_like(k3)
        dv3 = torch.zeros(B * H, Tk, Dv, dtype=torch.float32, device=q.device)
        # which features (one entry per query / key feature) and parameters the bias must be differentiated for
        needs = list(ctx.needs_input_grad[-len(tensors):]) if tensors else []
        wants = [needs[i] for i in slots] + needs[n_distinct:]
        grads_in = [None] * len(wants)  # summed over blocks; None where the bias never depends on the input
        # two (B*H, chunk, Tk) buffers for every block's logits / dS and probabilities: fresh multi-MB tensors per
        # block would cost page faults on CPU
        work = [torch.empty(B * H * min(ctx.chunk, Tq) * Tk, dtype=torch.float32, device=q.device) for _ in "SP"]

        for s, e, kend in _blocks(Tq, Tk, ctx.chunk):
            c = e - s
            # the bias again; leaves on the feature slices so that autograd returns their gradients
            leaves = [t[:, :, s:e] if i < nq else t[:, :, :kend] for i, t in enumerate(feats)]
            leaves = [t.detach().requires_grad_() if w else t for t, w in zip(leaves, wants)]
            with torch.enable_grad(), torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_on):
                bias = ctx.bias_fn(dict(zip(ctx.q_names, leaves[:nq])), dict(zip(ctx.k_names, leaves[nq:])),
                                   q_pos[s:e], k_pos[:kend])
            with torch.autocast(device_type, enabled=False):
                S, P = (w[:B * H * c * kend].view(B * H, c, kend) for w in work)
                torch.bmm(q3[:, s:e], k3[:, :kend].transpose(1, 2), out=S)  # q3 carries the scale
                S.view(B, H, c, kend).add_(bias.detach().to(q.dtype))  # the forward's (possibly rounded) bias
                S[:, :, kend - c:] += above[:c, :c]
                torch.softmax(S, dim=-1, out=P)
                do_b = do3[:, s:e]
                dv3[:, :kend].baddbmm_(P.transpose(1, 2), do_b)
                dS = torch.bmm(do_b, v3[:, :kend].transpose(1, 2), out=S).sub_(delta[:, s:e]).mul_(P)
                dq3[:, s:e].baddbmm_(dS, k3[:, :kend], beta=0.0, alpha=scale)
                dk3[:, :kend].baddbmm_(dS.transpose(1, 2), q3[:, s:e])
            if bias.requires_grad:
                grad = dS.view(B, H, c, kend)
                if bias.size(0) == 1 and B > 1:
                    grad = grad.sum(0, keepdim=True)
                inputs = leaves + list(params)
                index = [i for i, w in enumerate(wants) if w]
                grads = torch.autograd.grad(bias, [inputs[i] for i in index], grad.to(bias.dtype), allow_unused=True)
                for i, g in zip(index, grads):
                    if g is None:
                        continue
                    if grads_in[i] is None:
                        grads_in[i] = torch.zeros_like((feats + params)[i])
                    rows = slice(s, e) if i < nq else slice(0, kend)
                    (grads_in[i][:, :, rows] if i < nq + nk else grads_in[i]).add_(g)
            del bias

        # a tensor that was both a query and a key feature gets the sum of its two gradients, as autograd would
        # have summed them had it entered twice
        grads_distinct = [None] * n_distinct
        for slot, g in zip(slots, grads_in):
            if g is not None:
                grads_distinct[slot] = g if grads_distinct[slot] is None else grads_distinct[slot] + g
        shape4 = lambda t3, like: t3.view(B, H, t3.size(1), t3.size(2)).to(like.dtype)
        return (None, None, None, None, None, None, shape4(dq3, q), shape4(dk3, k), shape4(dv3, v),
                *grads_distinct, *grads_in[nq + nk:])


# --------------------------------------------------------------------------------------------------------------------
# FlexAttention (CUDA: attn_impl="auto" for ALiBi and GRAPE-A, FoX without fla, or "flex"): for the separable biases
# (model.PairwiseAdditive), whose b(i, j) is an elementwise function of per-token features, so that it can be a
# score_mod: one compiled kernel, no bias tensor at all; the gradients of the captured features and parameters are
# FlexAttention's (its learnable-bias support, atomic adds: not bitwise reproducible). On CPU, torch 2.13 has no
# FlexAttention backward and its uncompiled form builds the full score matrix, so the model keeps the chunked path
# there; the tests run this function uncompiled, forward only, against it.
#
# Sequences are padded to a multiple of FLEX_BLOCK (PyTorch issue #153799: the backward of a block mask with a
# score_mod gives NaN when the length is not a multiple of the 128-token block; padding also keeps every index a
# score_mod reads inside its captured tensors, #150321). Exact: the padding repeats the last token's q, k, v and
# features, a padded key lies after every real query (the causal mask hides it), and the padded queries' outputs
# are dropped, so their cotangent is zero and they add nothing to any gradient.

FLEX_BLOCK = 128  # FlexAttention's default block size, in queries and in keys
_BLOCK_MASKS = {}  # (Tq, Tk, offset, device) -> BlockMask: built once per shape (create_block_mask is costly)


def _causal_block_mask(Tq, Tk, offset, device):
    """Key j visible to query i iff j <= i + offset. A dict rather than functools.lru_cache: torch.compile traces
    through an lru_cache (rebuilding the mask in every call), but reads a dict entry as a constant."""
    key = (Tq, Tk, offset, device)
    mask = _BLOCK_MASKS.get(key)
    if mask is None:
        from torch.nn.attention.flex_attention import create_block_mask
        mask = _BLOCK_MASKS[key] = create_block_mask(lambda b, h, i, j: j <= i + offset, None, None, Tq, Tk,
                                                     device=device)
    return mask


@functools.lru_cache(maxsize=1)
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention)


def _pad_tokens(t, n):
    """t (B, H, T, ...) with its last token repeated n more times along T."""
    return t if n == 0 else torch.cat((t, t[:, :, -1:].expand(*t.shape[:2], n, *t.shape[3:])), dim=2)


class _At:
    """The features of one score's query or key: feats[name][index], looked up only for the names pair() reads
    (FoX's per-step gate, a feature of its fla kernel, is never loaded by the score_mod)."""

    def __init__(self, feats, index):
        self.feats, self.index = feats, index

    def __getitem__(self, name):
        return self.feats[name][self.index]


def flex_pairwise_attention(q, k, v, q_feats, k_feats, pair_fn, compiled=True, scale=None):
    """Causal attention with logits <q_i, k_j> * scale (default 1/sqrt(D)) + pair_fn(q_feats at i, k_feats at j,
    i - j, head), queries the last Tq of Tk positions; q, k, v (B, H, T, D), features (B, H, T, ...); returns
    (B, H, Tq, D) in q's dtype. Both lengths are padded to a multiple of FLEX_BLOCK (see above). Features are read
    in fp32 (FoX's fp64 running sum included: inside the kernel c_i - c_j is then an fp32 difference, as in FoX's
    own kernel, not re-centred per block). compiled: torch.compile's fused kernel (False: FlexAttention's
    reference implementation, which builds the scores; forward-only on CPU)."""
    from torch.nn.attention.flex_attention import flex_attention
    Tq, Tk = q.size(2), k.size(2)
    offset = Tk - Tq
    pad_q, pad_k = -Tq % FLEX_BLOCK, -Tk % FLEX_BLOCK
    q = _pad_tokens(q, pad_q)
    k, v = _pad_tokens(k, pad_k), _pad_tokens(v, pad_k)
    qf = {n: _pad_tokens(t.float(), pad_q) for n, t in q_feats.items()}
    kf = {n: _pad_tokens(t.float(), pad_k) for n, t in k_feats.items()}
    # FlexAttention's backward refuses a tensor that needs gradients read at two indices (query and key): a key
    # feature that is the very tensor of a query feature gets its own copy
    kf = {n: t.clone() if any(t is u for u in qf.values()) else t for n, t in kf.items()}

    def score_mod(score, b, h, i, j):
        bias = pair_fn(_At(qf, (b, h, i)), _At(kf, (b, h, j)), (i + offset - j).to(torch.float32), lambda t: t[h])
        return score + bias.to(score.dtype)

    # inside a compiled model (train.py compile=true) FlexAttention is captured as it is; eager calls take the
    # compiled function
    attend = flex_attention if (torch.compiler.is_compiling() or not compiled) else _compiled_flex_attention()
    mask = _causal_block_mask(Tq + pad_q, Tk + pad_k, offset, str(q.device))
    out = attend(q, k, v, score_mod=score_mod, block_mask=mask, scale=scale)
    return out[:, :, :Tq] if pad_q else out
