"""
One GPT (Llama-style) model for positional-encoding research; the positional encoding (PE) is a config field.

Architecture (the GRAPE reference model, arXiv 2512.07805):
    tokens -> tied embedding (vocab 50304, no position embedding)
           -> n_layer x [ h += Attn(RMSNorm(h)) ; h += SwiGLU(RMSNorm(h)) ]
           -> RMSNorm -> LM head (the embedding matrix) -> logits in fp32
    RMSNorm computes in fp32 (eps 1e-5, learnable gain). No biases, no dropout.
    Attention: c_q, c_k, c_v (C -> H*D), optional KV-shift on k and v, per-head QK RMSNorm whose D-sized gain
    is shared by all heads, softmax attention with scale 1/sqrt(D), c_proj (H*D -> C).
    SwiGLU: c_proj(silu(c_fc1 x) * c_fc2 x) with hidden width floor(8C/3).

Positional encodings. A PE plays up to two roles, each a small class below:
    rotary    acts on q and k before their dot product:        RoPE, GrapeM, GrapeMCtx, GrapeMRank2, GrapeMBasis,
                                                               GrapeMMix, PoPE, RoPEID
    additive  adds b_h(i, j) to the logit after the 1/sqrt(D): ALiBi, FoX, GrapeA (q/k/qk), GrapeAP
so that logit_h(i, j) = <R(i) q_i, R(j) k_j> / sqrt(D) + b_h(i, j) for j <= i (and -inf for j > i).
`GPTConfig.pos_encoding` names one PE ("rope", "alibi", ...), "nope" for neither, or a composition
"rotary+additive" (e.g. "grape_m+grape_ap", GRAPE paper App. E). Evaluation-time RoPE scalings (PI, NTK, YaRN,
dynamic) are config fields (rope_scaling) acting on the spectrum of rope / grape_m / grape_m_basis.

The interface a PE implements (so that new PEs slot in without touching the model):
    Rotary.angles(x, positions, cache) -> phi   fp32 angles broadcastable to (B, T, H, D/2); the base class
                                                rotates each half-split pair (m, m + D/2) of q and k by -phi.
    Rotary.forward(q, k, x, positions, cache)   overridden instead by maps that are not per-pair rotations
                                                (rank-2 generators, learned bases, mixtures, PoPE's 2D-wide polar
                                                form); Rotary.query_scale(positions) is a logit temperature.
    Additive.features(x, q, k, v, positions, cache) -> (q_feats, k_feats)
                                                per-token tensors laid out (B, H, T, ...); k_feats are appended
                                                to the KV cache, so decoding never recomputes past tokens.
    Additive.bias(q_feats, k_feats, q_pos, k_pos) -> (B|1, H, Tq, Tk) fp32 logit term, read where k_pos <= q_pos;
                                                called on slices (a block of queries, the keys up to its last
                                                position), so each PE's formula lives in its bias() only.
    PositionalEncoding.check(cfg)               (the base of both; a classmethod) ValueError naming the GPTConfig
                                                field whose value this PE cannot take; GPTConfig.__post_init__
                                                calls it for the PEs that pos_encoding names.
    PositionalEncoding.own_init, .global_init   the PE's parameters that its reset_parameters() sets, and those
                                                GPT.init_weights draws from N(0, sigma_h^2): each parameter in
                                                exactly one (init_weights refuses a model where one is not).
A PE is registered once, by name, in PE_CLASSES; ROTARY_PES, ADDITIVE_PES and SCALABLE_ROTARY_PES derive from it.
There is exactly one attention entry point (CausalSelfAttention.attend). By default (attn_impl="auto") it takes the
fastest exact path for the device and PE (attention_path(): on CUDA, FlexAttention for ALiBi and GRAPE-A, fla's
kernel for FoX, a Triton kernel for GRAPE-AP where installed) and otherwise the chunked path (attn_impl="chunked"),
the reference every fused kernel is tested against: SDPA on one block of attn_chunk_size queries at a time, with
that block's bias, recomputed in the backward (chunked_attention.py), so that no T x T tensor is built, kept, or
saved for the backward; its results are those of the dense path (attn_impl="dense": one (B, H, T, T) bias).

Conventions shared with the reference code (so that the same weights give the same logits):
    * rotation pairs are half-split, (m, m + D/2), and each pair is rotated by -phi (HF rotates by +phi);
    * the rotary PE is applied before QK-norm (`qk_norm_before_rotary=False`). That order breaks the exact
      relative law once the QK-norm gains move away from 1; `qk_norm_before_rotary=True` keeps it exact;
    * additive PEs use the QK-normed (un-rotated) q and k where they read q or k;
    * ALiBi slopes follow the ALiBi paper's recipe, including head counts that are not powers of two.
Deliberate departures from the reference code, each exact in real arithmetic:
    * KV-shift at decoding: the first token is mixed with a zero predecessor, as in training (the reference
      returns a lone first token unmixed, so its cached and full forwards disagree).
    * GRAPE-M-ctx: the cumulative phase is summed in fp64 (then rounded to fp32), not in fp32.
    * FoX: c = cumsum(log f) is summed and kept in fp64, and c_i - c_j is rounded to fp32 after re-centring on the
      first query of the slice, so a block's near-diagonal biases do not inherit the rounding of |c| ~ 0.69 t.
    * GRAPE-AP: the path sum b(t, j) = sum_{l=j+1..t} psi(t, l) is a cumulative sum over the keys in reverse order
      instead of "row total - inclusive cumsum", which loses ~1e-4 in fp32 once row totals reach 1e3; its probes
      are kept in fp32 (they are 8-dimensional, so this costs nothing).
"""

import logging
import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

# model.py and chunked_attention.py are also shipped as a transformers remote-code package (scripts/export_hf.py),
# where sibling modules are imported relatively; in this repository they are top-level modules.
try:
    from .chunked_attention import chunked_bias_attention, flex_pairwise_attention
except ImportError:
    from chunked_attention import chunked_bias_attention, flex_pairwise_attention
# The kernels that need optional packages (fla, Triton) are reached through fused_attention.py, which an export does
# not ship: without it attn_impl="auto" uses the fused paths that need torch alone (FlexAttention) and the chunked one.
try:
    import fused_attention
except ImportError:
    fused_attention = None

# The PE names (ROTARY_PES, ADDITIVE_PES, SCALABLE_ROTARY_PES) derive from the registry PE_CLASSES, after the PEs.
# Evaluation-time rescalings of a RoPE spectrum (PI, NTK-aware, YaRN, and their dynamic forms; see rope_scaling()).
ROPE_SCALINGS = ("none", "pi", "ntk", "yarn", "dynamic_ntk", "dynamic_yarn")
GRAPE_AP_TIES = ("none", "q", "k", "v")
ATTN_IMPLS = ("auto", "chunked", "dense", "flex")


# --------------------------------------------------------------------------------------------------------------------
# Config


@dataclass
class GPTConfig:
    n_layer: int = 12
    n_head: int = 6
    n_embd: int = 768
    head_dim: int = 128
    vocab_size: int = 50304  # GPT-2's 50257 padded to a multiple of 64
    block_size: int = 1024  # training context length; longer inputs are allowed (extrapolation studies)
    train_length: int = 0  # the training length L that RoPE-ID and rope_scaling refer to; 0 -> block_size (eval pins
    # it to the checkpoint's block_size, so that overriding block_size at evaluation changes no PE)
    pos_encoding: str = "rope"  # one of ROTARY_PES, ADDITIVE_PES, "nope", or "rotary+additive"
    kv_shift: bool = False  # data-dependent KV-shift on c_k and c_v (FoX "Pro" ShiftLinear)
    qk_norm: bool = True
    qk_norm_before_rotary: bool = False  # False = reference order (rotate, then normalise)
    norm_eps: float = 1e-5
    embedding_init_std: float = 0.02
    hidden_init_std_factor: float = 0.5  # sigma_h = factor / sqrt(n_embd); residual outputs sigma_h / sqrt(n_layer)
    rope_base: float = 10000.0  # RoPE base; also the initial spectrum of GRAPE-M (the reference's grape_base)
    # GRAPE-M (paper §3.1; reference llama-mha-grape-m-nonctx / -ctx)
    grape_learnable_freq: bool = True
    grape_share_across_heads: bool = True  # one spectrum per layer (True) or one per head
    grape_log_freq_scale: float = 16.0  # theta = exp(lambda / scale): Adam's step on log(theta) shrinks by scale
    grape_ctx_per_head: bool = False  # GRAPE-M-ctx: one contextual phase per layer (False) or per head
    grape_ctx_init_omega: float = 1e-3  # phase-gate bias = softplus^-1(this)
    grape_ctx_omega_scale: float = 16.0  # omega_t = sigmoid((w.x_t + b) / scale)
    grape_mix_rank: int = 16  # GRAPE-M-mix: r, the dimension of the subspace E the generator E L_r E^T acts in
    # RoPE-ID (Wertheimer et al., 2026): half the channels rotate at high frequencies, the other half not at all
    rope_id_temperature: bool = True  # scale query t's logits by (1 + 0.1 ln(max(t, L) / L))^2, L = train length
    # Evaluation-time RoPE scaling for rope / grape_m / grape_m_basis (no retraining): see rope_scaling()
    rope_scaling: str = "none"  # one of ROPE_SCALINGS
    rope_scaling_factor: float = 1.0  # s = target length / original length (static variants; dynamic_ntk's alpha)
    yarn_beta_fast: float = 32.0  # YaRN ramp: pairs turning more than beta_fast times in L keep their frequency
    yarn_beta_slow: float = 1.0  # ... and pairs turning fewer than beta_slow times are fully interpolated
    # GRAPE-A (paper §4; reference llama-mha-grape-a-*gated)
    grape_a_omega_init: float = 1.0  # softplus(omega) at init
    grape_a_gate_init_std: float | None = None  # std of the gate directions u, v; None -> 1/sqrt(head_dim)
    grape_a_gate_l2_norm: bool = True  # use u/|u| and v/|v|
    grape_a_gate_l2_eps: float = 1e-6
    # GRAPE-AP (paper §5; reference llama-mha-grape-ap-v1)
    grape_ap_p_head_dim: int = 8  # probe width (untied); tied probes use head_dim
    grape_ap_tie: str = "none"  # probe source: own projection c_p, or the normed q, normed k, or v
    grape_ap_query_norm: bool = False  # False = reference (raw query probe); True = paper eq. 5.1 (both normalised)
    # How an additive PE's bias meets attention (CausalSelfAttention.attend, attention_path). "auto": the fastest
    # exact path for the device and PE (on CUDA for full sequences: FlexAttention for ALiBi and GRAPE-A, fla's kernel
    # for FoX, the GRAPE-AP kernel where installed), else "chunked"; "chunked": exact, blocks of attn_chunk_size
    # queries, O(B H T chunk) memory in forward and backward (chunked_attention.py), the reference of every fused
    # path; "dense": one (B, H, T, T) bias through SDPA, O(B H T^2) memory, the reference of the chunked path;
    # "flex": FlexAttention for ALiBi, FoX and GRAPE-A where "auto" could use it (else chunked). Every choice gives
    # the same function; checkpoints written before this field existed get "auto".
    attn_impl: str = "auto"
    attn_chunk_size: int = 128

    def __post_init__(self):
        """Reject out-of-range values with the field named: the shared fields here, then the fields of the PEs that
        pos_encoding names, by each PE class's check()."""
        rotary, additive = split_pos_encoding(self.pos_encoding)
        for name in ("vocab_size", "n_layer", "n_head", "n_embd", "head_dim", "block_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {getattr(self, name)!r}")
        if self.rope_scaling not in ROPE_SCALINGS:
            raise ValueError(f"GPTConfig.rope_scaling must be one of {ROPE_SCALINGS}, got {self.rope_scaling!r}")
        if self.rope_scaling != "none" and rotary not in SCALABLE_ROTARY_PES:
            raise ValueError(f"GPTConfig.rope_scaling={self.rope_scaling!r} applies to a RoPE spectrum "
                             f"{SCALABLE_ROTARY_PES}, not to pos_encoding {self.pos_encoding!r}")
        if self.rope_scaling_factor < 1.0 or self.train_length < 0:
            raise ValueError(f"GPTConfig.rope_scaling_factor must be >= 1 and train_length >= 0, got "
                             f"{self.rope_scaling_factor} and {self.train_length}")
        if self.attn_impl not in ATTN_IMPLS:
            raise ValueError(f"GPTConfig.attn_impl must be one of {ATTN_IMPLS}, got {self.attn_impl!r}")
        if not isinstance(self.attn_chunk_size, int) or self.attn_chunk_size <= 0:
            raise ValueError(f"GPTConfig.attn_chunk_size must be a positive int, got {self.attn_chunk_size!r}")
        if self.grape_ap_tie not in GRAPE_AP_TIES:
            raise ValueError(f"GPTConfig.grape_ap_tie must be one of {GRAPE_AP_TIES}, got {self.grape_ap_tie!r}")
        for name in (rotary, additive):
            if name is not None:
                PE_CLASSES[name].check(self)

    @classmethod
    def from_preset(cls, name, **overrides):
        """The paper's sizes: PRESETS[name] with any field overridden."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; expected one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self):
        return {f.name: getattr(self, f.name) for f in fields(self)}


PRESETS = {
    # GRAPE paper §6.1: 353,508,352 (medium) and 772,234,496 (large) parameters with RoPE.
    "medium": dict(n_layer=24, n_head=8, n_embd=1024, head_dim=128, block_size=4096),
    "large": dict(n_layer=36, n_head=10, n_embd=1280, head_dim=128, block_size=4096),
}


def split_pos_encoding(name):
    """'rope' -> ('rope', None); 'alibi' -> (None, 'alibi'); 'grape_m+grape_ap' -> ('grape_m', 'grape_ap')."""
    if not isinstance(name, str):
        raise ValueError(f"GPTConfig.pos_encoding must be a string, got {name!r}")
    if name == "nope":
        return None, None
    parts = name.split("+")
    if len(parts) == 1:
        if name in ROTARY_PES:
            return name, None
        if name in ADDITIVE_PES:
            return None, name
    elif len(parts) == 2 and parts[0] in ROTARY_PES and parts[1] in ADDITIVE_PES:
        return parts[0], parts[1]
    raise ValueError(f"unknown GPTConfig.pos_encoding {name!r}; expected 'nope', one of {ROTARY_PES + ADDITIVE_PES}, "
                     f"or 'rotary+additive' with rotary in {ROTARY_PES} and additive in {ADDITIVE_PES}")


# --------------------------------------------------------------------------------------------------------------------
# Numerical helpers shared by several PEs


def at_least_fp32(x):
    """x in fp32 if it is in a lower precision (bf16/fp16 under autocast), else unchanged (fp32, fp64)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def rms_norm(x, weight=None, eps=1e-5):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in fp32 and returned in x's dtype."""
    x32 = at_least_fp32(x)
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * at_least_fp32(weight)
    return y.to(x.dtype)


def rotate_half_split(x, cos, sin):
    """Rotate each pair (x_m, x_{m+d/2}) of the last axis by -phi (the reference's sign):
    a' = a cos(phi) + b sin(phi),  b' = -a sin(phi) + b cos(phi).
    cos, sin: fp32, broadcastable to x.shape[:-1] + (d/2,). Computed in fp32, returned in x's dtype."""
    half = x.shape[-1] // 2
    a, b = at_least_fp32(x[..., :half]), at_least_fp32(x[..., half:])
    return torch.cat((a * cos + b * sin, b * cos - a * sin), dim=-1).to(x.dtype)


def rope_inv_freq(dim, base, device=None, dtype=torch.float32):
    """theta_m = base^(-2m/dim), m = 0 .. dim/2 - 1 (RoPE's log-uniform spectrum), fp32 unless asked otherwise."""
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=dtype, device=device) / dim))


def rope_scaling(inv_freq, cfg, positions):
    """Evaluation-time rescaling of a rotary spectrum (no retraining), pair by pair (m = 0 .. D/2-1 on the last
    axis of inv_freq), for cfg.rope_scaling; returns (inv_freq', logit_scale). L = train_length
    (or block_size), s = rope_scaling_factor, d = head_dim, b = rope_base:
        pi            theta'_m = theta_m / s                                   (Chen et al., 2023)
        ntk           theta'_m = theta_m * s^(-2m/(d-2)), i.e. base b * s^(d/(d-2)) for RoPE   (NTK-aware)
        yarn          theta'_m = (1 - g_m) theta_m / s + g_m theta_m, logits x (0.1 ln s + 1)^2   (Peng et al., 2024)
                      g_m = 1 - clip((m - low) / (high - low), 0, 1), low = floor(idx(beta_fast)),
                      high = ceil(idx(beta_slow)), idx(x) = d ln(L / (2 pi x)) / (2 ln b), clamped to [0, d-1]:
                      the ramp of the YaRN code and of transformers (linear in the pair index), not the paper's
                      ramp in the number of turns
        dynamic_ntk   ntk with s = alpha l / L - (alpha - 1) for a sequence of l > L tokens (alpha = s), else none
        dynamic_yarn  yarn with s = max(1, l / L)
    l = the largest position + 1. For a learned spectrum (grape_m) the same per-pair factors apply, computed from the
    base-b spectrum the model was initialised with. The logit scale multiplies the queries after QK-norm (the
    reference normalises after rotating, which would undo YaRN's usual scaling of cos and sin). Dynamic variants
    change with the sequence length: a full forward uses one l for every position, cached decoding the l of each
    step (keys keep the frequencies they were rotated with, as in transformers)."""
    kind = cfg.rope_scaling
    if kind == "none":
        return inv_freq, 1.0
    L = cfg.train_length or cfg.block_size
    s, d, base = cfg.rope_scaling_factor, cfg.head_dim, cfg.rope_base
    if kind.startswith("dynamic"):
        length = int(positions[-1]) + 1
        s = max(1.0, s * length / L - (s - 1.0)) if kind == "dynamic_ntk" else max(1.0, length / L)
    if s == 1.0:
        return inv_freq, 1.0
    m = torch.arange(inv_freq.size(-1), device=inv_freq.device, dtype=inv_freq.dtype)
    if kind == "pi":
        return inv_freq / s, 1.0
    if kind in ("ntk", "dynamic_ntk"):
        return inv_freq * s ** (-2.0 * m / max(d - 2, 1)), 1.0
    idx = lambda turns: d * math.log(L / (2 * math.pi * turns)) / (2 * math.log(base))
    low = max(math.floor(idx(cfg.yarn_beta_fast)), 0)
    high = min(math.ceil(idx(cfg.yarn_beta_slow)), d - 1)
    high = high + 0.001 if high == low else high
    keep = 1.0 - ((m - low) / (high - low)).clamp(0.0, 1.0)
    return inv_freq / s * (1.0 - keep) + inv_freq * keep, (0.1 * math.log(s) + 1.0) ** 2


def alibi_slopes(n_head):
    """ALiBi's fixed per-head slopes (Press et al., 2022). For a power of two n: 2^(-8/n), 2^(-16/n), ..., 2^-8.
    Otherwise the slopes of the closest lower power of two P, then every other slope of the 2P recipe
    (indices 0, 2, 4, ...) up to n heads. H = 10: [2^-1 .. 2^-8, 2^-0.5, 2^-1.5]."""
    def power_of_two(n):
        start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [start ** (i + 1) for i in range(n)]
    if math.log2(n_head).is_integer():
        return power_of_two(n_head)
    p = 2 ** math.floor(math.log2(n_head))
    return power_of_two(p) + power_of_two(2 * p)[0::2][: n_head - p]


def inv_softplus(y):
    """softplus^-1(y) = log(exp(y) - 1), for y > 0."""
    return math.log(math.expm1(y))


def causal_mask(q_pos, k_pos):
    """True where key position > query position (the entries to hide)."""
    return k_pos[None, :] > q_pos[:, None]


# --------------------------------------------------------------------------------------------------------------------
# Norm and KV-shift


class RMSNorm(nn.Module):
    own_init = ("weight",)  # the init contract of GPT.init_weights: the gain keeps its reset_parameters() value, 1
    global_init = ()

    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self):
        nn.init.ones_(self.weight)

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


class ShiftLinear(nn.Module):
    """Data-dependent KV-shift (FoX "Pro" ShiftLinear; cf. KV Shifting Attention, Xu et al. 2024).
    y_t = W x_t, alpha_{t,h} = sigmoid(shift_proj(x_t)_h) (fp32), and per head h
        out_{t,h} = alpha_{t,h} * y_{t-1,h} + (1 - alpha_{t,h}) * y_{t,h},   y_{-1} = `prev` or 0.
    Mixing in fp32, output in y's dtype. Returns (out, y_last): y_last is the un-shifted projection of the last
    token, the state the next decoding step needs."""

    def __init__(self, in_features, out_features, n_head):
        super().__init__()
        self.n_head = n_head
        self.linear = nn.Linear(in_features, out_features, bias=False)
        self.shift_proj = nn.Linear(in_features, n_head, bias=False)

    def forward(self, x, prev=None):
        B, T, _ = x.shape
        y = self.linear(x)
        alpha = torch.sigmoid(at_least_fp32(self.shift_proj(x))).unsqueeze(-1)  # (B, T, H, 1)
        first = torch.zeros_like(y[:, :1]) if prev is None else prev[:, None].to(y.dtype)
        y_prev = torch.cat((first, y[:, :-1]), dim=1)
        heads = (B, T, self.n_head, -1)
        out = alpha * at_least_fp32(y_prev).view(heads) + (1.0 - alpha) * at_least_fp32(y).view(heads)
        return out.to(y.dtype).view_as(y), y[:, -1]


# --------------------------------------------------------------------------------------------------------------------
# What every PE declares: its config checks and the init of each of its parameters.


class PositionalEncoding(nn.Module):
    """What every PE declares besides its formula (the base of Rotary and Additive):
        check(cfg)          raise ValueError naming the GPTConfig field when cfg's values cannot build this PE;
                            GPTConfig.__post_init__ calls it for the PEs pos_encoding names
        own_init            names (relative to the PE) of the parameters its reset_parameters() sets
        global_init         names of the parameters GPT.init_weights draws from the model's N(0, sigma_h^2)
        reset_parameters()  sets every own_init parameter and every buffer; draws no other parameter
    Every parameter of a PE is named in exactly one of own_init and global_init (GPT.init_weights refuses a model
    where one is not); a name may be absent in some configurations (GRAPE-A's u without a key gate). The
    constructor only allocates: build_pe() calls reset_parameters() once the PE exists, and GPT.init_weights again."""

    own_init = ()
    global_init = ()

    @classmethod
    def check(cls, cfg):
        pass

    def reset_parameters(self):
        pass


# --------------------------------------------------------------------------------------------------------------------
# Rotary PEs: rotate q and k by angles phi; the base class does the rotation, subclasses give phi.


class Rotary(PositionalEncoding):
    """A PE that acts on q and k before their dot product. Subclasses give angles phi (the base class rotates each
    half-split pair (m, m + D/2) by -phi) or override forward (maps that are not per-pair rotations)."""

    norm_first = False  # True: QK-norm precedes this PE whatever qk_norm_before_rotary says (PoPE reads magnitudes)
    rope_scalable = False  # True: a RoPE spectrum (or one learned from it), which rope_scaling may rescale

    @classmethod
    def check(cls, cfg):
        if cfg.head_dim % 2:
            raise ValueError(f"GPTConfig.head_dim must be even for rotary pos_encoding "
                             f"{cfg.pos_encoding!r}, got {cfg.head_dim}")

    def angles(self, x, positions, cache):
        """Rotation angles phi, broadcastable to (B, T, H, D/2), in fp32 (fp64 for an fp64 model)."""
        raise NotImplementedError

    def forward(self, q, k, x, positions, cache=None):
        """q, k: (B, T, H, D); x: the attention input (B, T, C); positions: (T,) absolute positions.
        Returns q, k (B, T, H, D') in their dtype; D' = D except for PoPE (2D)."""
        phi = self.angles(x, positions, cache)
        cos, sin = phi.cos(), phi.sin()
        return rotate_half_split(q, cos, sin), rotate_half_split(k, cos, sin)

    def query_scale(self, positions):
        """A factor on each query's logits (a float or a (T,) tensor), applied to q after QK-norm; 1.0 = none."""
        return 1.0


class SpectralRotary(Rotary):
    """A rotary PE defined by a spectrum theta (one frequency per pair, shared by all heads or per head):
    phi_{t,h,m} = t * theta_{h,m}. The evaluation-time rescalings (rope_scaling) act on this spectrum."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg

    def frequencies(self, dtype, device):
        """theta, shape (D/2,) or (H, D/2), before any rope_scaling."""
        raise NotImplementedError

    def angles(self, x, positions, cache):
        freqs, _ = rope_scaling(self.frequencies(at_least_fp32(x).dtype, positions.device), self.cfg, positions)
        return (positions.to(freqs.dtype)[:, None, None] * freqs)[None]  # (1, T, 1|H, D/2)

    def query_scale(self, positions):
        return rope_scaling(torch.ones(self.cfg.head_dim // 2, device=positions.device), self.cfg, positions)[1]


class RoPE(SpectralRotary):
    """RoPE (Su et al., 2021): phi_{t,m} = t * base^(-2m/D). No parameters; q_i.k_j depends on i - j only."""

    rope_scalable = True

    def frequencies(self, dtype, device):
        return rope_inv_freq(self.cfg.head_dim, self.cfg.rope_base, device, dtype)


def add_log_freq(module, cfg):
    """Give module its log-spectrum `log_freq`, uninitialised: shape (D/2,) shared by the layer's heads, or (H, D/2)
    when grape_share_across_heads is false; a Parameter if grape_learnable_freq, else a buffer (saved all the same,
    so a checkpoint has the same keys either way)."""
    shape = (cfg.head_dim // 2,) if cfg.grape_share_across_heads else (cfg.n_head, cfg.head_dim // 2)
    log_freq = torch.empty(shape)
    if cfg.grape_learnable_freq:
        module.log_freq = nn.Parameter(log_freq)
    else:
        module.register_buffer("log_freq", log_freq)


class GrapeM(SpectralRotary):
    """Multiplicative GRAPE on the canonical coordinate planes (paper §3.1, Prop. 3.1) with a learnable spectrum:
    G(n) = exp(n sum_m theta_m L_m) rotates plane m by n * theta_m, phi_{t,h,m} = t * theta_{h,m}.
    theta = exp(lambda / S) with lambda initialised to S * log(RoPE spectrum), so at init GRAPE-M == RoPE.
    S = grape_log_freq_scale (16) shrinks Adam's effective step on log(theta) by S (the reference's
    "lr-scaling trick"). lambda has shape (D/2,) shared by all heads of the layer, or (H, D/2)."""

    rope_scalable = True
    own_init = ("log_freq",)

    def __init__(self, cfg):
        super().__init__(cfg)
        self.scale = cfg.grape_log_freq_scale
        add_log_freq(self, cfg)

    @torch.no_grad()
    def reset_parameters(self):
        spectrum = rope_inv_freq(self.cfg.head_dim, self.cfg.rope_base, self.log_freq.device)
        self.log_freq.copy_((self.scale * spectrum.log()).expand_as(self.log_freq))

    def frequencies(self, dtype=torch.float32, device=None):
        return (at_least_fp32(self.log_freq) / self.scale).exp()


def orthogonal_from_skew(a):
    """B = exp(a - a^T): exactly orthogonal (det 1) for any square a, B = I at a = 0; batched over leading axes."""
    a = at_least_fp32(a)
    return torch.linalg.matrix_exp(a - a.transpose(-1, -2))


class GrapeMBasis(GrapeM):
    """Multi-subspace GRAPE-M in a learned orthogonal basis (paper Prop. 3.1, Algorithm 1): d/2 commuting rank-2
    generators on the planes spanned by columns (m, m + D/2) of B in SO(D),
        G(n) = B blockdiag(R(n theta_1), ..., R(n theta_{D/2})) B^T,    x -> B R(n theta) B^T x,
    with the spectrum of GRAPE-M (learned, /16 lr-scaling) and B = exp(A - A^T) (orthogonal_from_skew) for a free
    A (D, D) per layer (or per head when grape_share_across_heads=false), A = 0 at init, so that it starts as
    GRAPE-M (== RoPE). G(n) is again a one-parameter subgroup: q~_i.k~_j = q_i^T G(j - i) k_j. Cost: two D x D
    products per token and head for q and for k on top of the rotation (O(D^2); the rotation itself is O(D))."""

    own_init = ("log_freq", "basis_skew")

    def __init__(self, cfg):
        super().__init__(cfg)
        heads = 1 if cfg.grape_share_across_heads else cfg.n_head
        self.basis_skew = nn.Parameter(torch.empty(heads, cfg.head_dim, cfg.head_dim))

    @torch.no_grad()
    def reset_parameters(self):
        super().reset_parameters()
        nn.init.zeros_(self.basis_skew)

    def basis(self):
        return orthogonal_from_skew(self.basis_skew)  # (1|H, D, D), columns = the basis vectors

    def forward(self, q, k, x, positions, cache=None):
        phi = self.angles(x, positions, cache)
        cos, sin = phi.cos(), phi.sin()
        basis = self.basis()

        def conjugated(t):  # B R B^T t per head: coordinates c = B^T t, rotate, back with B
            c = torch.einsum("bthd,hde->bthe", at_least_fp32(t), basis.expand(t.size(2), -1, -1))
            c = rotate_half_split(c, cos, sin)
            return torch.einsum("bthe,hde->bthd", c, basis.expand(t.size(2), -1, -1)).to(t.dtype)
        return conjugated(q), conjugated(k)


class GrapeMCtx(Rotary):
    """Contextual multiplicative GRAPE ("phase-modulated", paper §3 / reference llama-mha-grape-m-ctx):
    positions are replaced by a cumulative, token-dependent phase
        omega_t = sigmoid((w . x_t + b) / s),   Phi_t = sum_{tau < t} omega_tau,   phi_{t,h,m} = Phi_t * theta_m,
    so q_i.k_j depends on Phi_i - Phi_j only. theta = exp(lambda), lambda = log(RoPE spectrum) at init (no scaling
    here). w starts at 0 and b = softplus^-1(1e-3), i.e. omega_t = sigmoid(-6.9073 / 16) = 0.3937 for every token
    at init (the reference's comment says ~1e-3, which was true of an older softplus gate; the code is followed).
    Decoding keeps the running total Phi in the cache."""

    own_init = ("log_freq", "omega_proj.weight", "omega_proj.bias")

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        add_log_freq(self, cfg)
        self.omega_proj = nn.Linear(cfg.n_embd, cfg.n_head if cfg.grape_ctx_per_head else 1, bias=True)

    @torch.no_grad()
    def reset_parameters(self):
        spectrum = rope_inv_freq(self.cfg.head_dim, self.cfg.rope_base, self.log_freq.device)
        self.log_freq.copy_(spectrum.log().expand_as(self.log_freq))
        nn.init.zeros_(self.omega_proj.weight)
        nn.init.constant_(self.omega_proj.bias, inv_softplus(self.cfg.grape_ctx_init_omega))

    def frequencies(self):
        return at_least_fp32(self.log_freq).exp()

    def phase(self, x, cache=None):
        """Phi (B, T, 1|H) fp32: the exclusive prefix sum of omega, continued from the cache's running total."""
        omega = torch.sigmoid(at_least_fp32(self.omega_proj(x)) / self.cfg.grape_ctx_omega_scale)
        dtype, omega = omega.dtype, omega.double()
        # fp64 prefix sum (a (B, T, 1) tensor, so free): an fp32 running sum drifts like sqrt(T) * eps * Phi,
        # which at Phi ~ 1e3 is far above the fp32 rounding of Phi itself; it also makes cached == full.
        phase = omega.cumsum(1) - omega
        if cache is not None:
            if "phase" in cache.state:
                phase = phase + cache.state["phase"][:, None]
            cache.state["phase"] = phase[:, -1] + omega[:, -1]
        return phase.to(dtype)

    def angles(self, x, positions, cache):
        return self.phase(x, cache)[..., None] * self.frequencies()  # (B, T, 1|H, D/2)


def rodrigues_rotate(x, a, b, angle):
    """exp(angle * L) x for the rank-2 generator L = a b^T - b a^T (GRAPE §2, App. I), in O(d), no matrix_exp.
    With alpha = |a|^2, gamma = a.b and b_perp = b - (gamma / alpha) a (the part of b orthogonal to a), L equals
    a b_perp^T - b_perp a^T exactly, so with u = a.x, w = b_perp.x, beta_perp = |b_perp|^2:
        L x = a w - b_perp u,   L^2 x = -(beta_perp a u + alpha b_perp w) = -s^2 P_span(a,b) x,
        s^2 = alpha beta_perp = alpha beta - gamma^2,
        exp(nL) x = x + n S1(z) L x + n^2 S2(z) L^2 x,   z = n s,  S1(z) = sin z / z,  S2(z) = (1 - cos z) / z^2,
    a rotation by n s in span(a, b), the identity on its complement. Working with b_perp instead of the textbook
    L^2 x = gamma (a v + b u) - beta a u - alpha b v avoids its cancellation when a and b are nearly parallel
    (there it loses all digits, and n^2 amplifies the loss). S1, S2 are even, so they are evaluated from z^2 (Taylor
    series below z^2 = 1e-2, S2 as sinc(z/2)^2 / 2 above, which does not cancel): neither s -> 0 nor n -> 0
    divides by zero, in the value or its gradient. With a = e_m, b = e_{m+d/2} this is rotate_half_split of plane m
    by n (the reference's sign). x: (..., d); a, b: broadcastable to x; angle: broadcastable to x[..., :1]
    (n omega per token and head). Computed in fp32 (or fp64), returned in x's dtype."""
    x32, a, b = at_least_fp32(x), at_least_fp32(a), at_least_fp32(b)
    alpha = (a * a).sum(-1, keepdim=True)
    b_perp = b - (a * b).sum(-1, keepdim=True) / alpha.clamp_min(torch.finfo(alpha.dtype).tiny) * a
    beta_perp = (b_perp * b_perp).sum(-1, keepdim=True)
    u, w = (a * x32).sum(-1, keepdim=True), (b_perp * x32).sum(-1, keepdim=True)
    lx = a * w - b_perp * u
    l2x = -(beta_perp * u * a + alpha * w * b_perp)
    angle = at_least_fp32(angle)
    z2 = angle * angle * alpha * beta_perp
    small = z2 < 1e-2
    z = torch.where(small, torch.ones_like(z2), z2).sqrt()  # the large-z branch only: no sqrt'(0)
    s1 = torch.where(small, 1 - z2 / 6 * (1 - z2 / 20 * (1 - z2 / 42)), torch.sin(z) / z)
    half = torch.sin(z / 2) / (z / 2)
    s2 = torch.where(small, 0.5 - z2 / 24 * (1 - z2 / 30 * (1 - z2 / 56)), 0.5 * half * half)
    return (x32 + angle * s1 * lx + angle * angle * s2 * l2x).to(x.dtype)


class GrapeMRank2(Rotary):
    """GRAPE-M with one general rank-2 generator per head (paper §2): G_h(n) = exp(n omega_h L(a_h, b_h)),
    L(a, b) = a b^T - b a^T, applied in O(D) by rodrigues_rotate. It rotates span(a_h, b_h) by n omega_h s_h
    (s = |a||b| sin angle(a, b)) and leaves the other D - 2 directions position-free. q~_i.k~_j = q_i^T G(j - i) k_j.
    Learned: a_h, b_h (H, D) and log omega_h (H,). Init: a_h = e_m, b_h = e_{m+D/2} with m = h mod D/2 (so s = 1 and
    head h rotates the half-split plane m), omega_h = base^(-h/H) (log-uniform over heads)."""

    own_init = ("a", "b", "log_omega")

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        H, D = cfg.n_head, cfg.head_dim
        self.a, self.b = nn.Parameter(torch.empty(H, D)), nn.Parameter(torch.empty(H, D))
        self.log_omega = nn.Parameter(torch.empty(H))

    @torch.no_grad()
    def reset_parameters(self):
        H, D = self.a.shape
        plane = torch.arange(H) % (D // 2)
        self.a.zero_()[torch.arange(H), plane] = 1.0
        self.b.zero_()[torch.arange(H), plane + D // 2] = 1.0
        self.log_omega.copy_(-math.log(self.cfg.rope_base) * torch.arange(H) / H)

    def forward(self, q, k, x, positions, cache=None):
        angle = positions.to(at_least_fp32(self.log_omega).dtype)[:, None, None] * self.log_omega.exp()[:, None]
        return rodrigues_rotate(q, self.a, self.b, angle), rodrigues_rotate(k, self.a, self.b, angle)  # (T, H, 1)


class GrapeMMix(Rotary):
    """GRAPE-M with a compact non-commuting mixture (paper App. D): L = E L_r E^T with E (D, r) orthonormal and
    L_r = P - P^T in so(r) a free skew matrix (any mixture of the r(r-1)/2 plane generators, commuting or not), so
        G(n) = exp(n L) = I + E (exp(n L_r) - I) E^T,     x -> x + E (exp(n L_r) E^T x - E^T x),
    O(r D) per token and head, plus exp(n L_r) once per position (a batched r x r matrix_exp, in fp64). E holds r
    columns of orthogonal_from_skew(A), A (D, D): the coordinates of the first r/2 half-split planes (m, m + D/2),
    m < r/2. Init A = 0 and L_r = RoPE's generator for head dim r (pair i turns at base^(-2i/r)): RoPE on r of the
    D channels, the other D - r position-free; with r = D exactly RoPE. r = grape_mix_rank; E and L_r per layer, or
    per head when grape_share_across_heads=false. G is a one-parameter subgroup: q~_i.k~_j = q_i^T G(j - i) k_j."""

    own_init = ("basis_skew", "generator")

    @classmethod
    def check(cls, cfg):
        super().check(cfg)
        if not (0 < cfg.grape_mix_rank <= cfg.head_dim and cfg.grape_mix_rank % 2 == 0):
            raise ValueError(f"GPTConfig.grape_mix_rank must be an even int in [2, head_dim={cfg.head_dim}], "
                             f"got {cfg.grape_mix_rank}")

    def __init__(self, cfg):
        super().__init__()
        self.cfg, r, D = cfg, cfg.grape_mix_rank, cfg.head_dim
        heads = 1 if cfg.grape_share_across_heads else cfg.n_head
        self.basis_skew = nn.Parameter(torch.empty(heads, D, D))
        self.generator = nn.Parameter(torch.empty(heads, r, r))
        self.register_buffer("columns", torch.empty(r, dtype=torch.long), persistent=False)

    @torch.no_grad()
    def reset_parameters(self):
        r = self.generator.size(-1)
        nn.init.zeros_(self.basis_skew)
        self.generator.zero_()[:, torch.arange(r // 2), r // 2 + torch.arange(r // 2)] = rope_inv_freq(
            r, self.cfg.rope_base)
        self.columns.copy_(torch.cat((torch.arange(r // 2), self.cfg.head_dim // 2 + torch.arange(r // 2))))

    def subspace(self):
        """E (1|H, D, r) and L_r (1|H, r, r), fp32."""
        g = at_least_fp32(self.generator)
        return orthogonal_from_skew(self.basis_skew)[..., self.columns], g - g.transpose(-1, -2)

    def forward(self, q, k, x, positions, cache=None):
        E, L_r = self.subspace()
        H = q.size(2)
        E = E.expand(H, -1, -1)
        # fp64: exp(n L_r) by scaling and squaring loses ~n * 1e-7 in fp32 (6e-4 at n = 4096, where RoPE's fp32
        # cos(n theta) is good to 3e-8); T x (1|H) matrices of r x r cost nothing next to the attention
        G = torch.linalg.matrix_exp(positions.double()[:, None, None, None] * L_r.double()).to(L_r.dtype)
        G = G.expand(-1, H, -1, -1)

        def apply(t):
            y = torch.einsum("bthd,hdr->bthr", at_least_fp32(t), E)
            z = torch.einsum("thrs,bths->bthr", G, y) - y
            return (at_least_fp32(t) + torch.einsum("bthr,hdr->bthd", z, E)).to(t.dtype)
        return apply(q), apply(k)


class PoPE(Rotary):
    """PoPE, polar coordinate position embedding (Gopalakrishnan et al., 2025): content sets magnitudes, position
    alone sets phases, on all D channels (no pairing):
        mu^q_{t,c} = softplus(q_{t,c}),  mu^k_{s,c} = softplus(k_{s,c}),  theta_c = base^(-c/D), c = 0 .. D-1,
        logit(t, s) = sum_c mu^q_{t,c} mu^k_{s,c} cos((s - t) theta_c + delta_{h,c}) / sqrt(D),
    delta (H, D) a learned key phase offset clamped to [-2 pi, 0] every forward (init 0). Computed as a dot product
    of 2D-wide Cartesian vectors q^ = [mu^q cos(t theta); mu^q sin(t theta)], k^ = [mu^k cos(s theta + delta);
    mu^k sin(s theta + delta)]; the attention keeps the scale 1/sqrt(D) and the D-wide values, and the KV cache
    holds k^ (2D per token: twice RoPE's K cache). QK-norm comes first (norm_first), then softplus."""

    norm_first = True
    own_init = ("phase_bias",)

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.phase_bias = nn.Parameter(torch.empty(cfg.n_head, cfg.head_dim))

    @torch.no_grad()
    def reset_parameters(self):
        nn.init.zeros_(self.phase_bias)

    def forward(self, q, k, x, positions, cache=None):
        D = self.cfg.head_dim
        dtype = at_least_fp32(q).dtype
        theta = 1.0 / self.cfg.rope_base ** (torch.arange(D, device=q.device, dtype=dtype) / D)
        phi = (positions.to(dtype)[:, None] * theta)[None, :, None, :]  # (1, T, 1, D)
        phi_k = phi + at_least_fp32(self.phase_bias).clamp(-2 * math.pi, 0.0)  # (1, T, H, D)

        def polar(t, angle):
            mu = F.softplus(at_least_fp32(t))
            return torch.cat((mu * angle.cos(), mu * angle.sin()), dim=-1).to(t.dtype)
        return polar(q, phi), polar(k, phi_k)


class RoPEID(SpectralRotary):
    """RoPE-ID, "RoPE in distribution" (Wertheimer et al., Frayed RoPE and Long Inputs, 2026): the first D/4
    half-split pairs (channels of the 1st and 3rd quarters) rotate at frequencies log-spaced from 2 pi / 32 (a turn
    every 32 tokens) down to 4 pi / L (two turns per training length L = train_length or block_size), so every
    rotated channel has swept its whole circle during training; the other D/2 channels are not rotated. With
    rope_id_temperature the logits of query t are scaled by (1 + 0.1 ln(max(t, L) / L))^2 (YaRN's temperature at
    the query's own length; 1 inside the training window). No parameters."""

    @classmethod
    def check(cls, cfg):
        super().check(cfg)
        if cfg.head_dim % 4 or cfg.head_dim < 8:
            raise ValueError(f"GPTConfig.head_dim must be a multiple of 4 and >= 8 for rope_id (a quarter of the "
                             f"channels are rotation pairs), got {cfg.head_dim}")

    def frequencies(self, dtype, device):
        D, L = self.cfg.head_dim, self.cfg.train_length or self.cfg.block_size
        fast = torch.linspace(math.log(2 * math.pi / 32), math.log(4 * math.pi / L), D // 4, dtype=torch.float64)
        return torch.cat((fast.exp(), torch.zeros(D // 2 - D // 4, dtype=torch.float64))).to(device, dtype)

    def query_scale(self, positions):
        if not self.cfg.rope_id_temperature:
            return 1.0
        L = self.cfg.train_length or self.cfg.block_size
        return (1.0 + 0.1 * torch.log(positions.clamp_min(L).double() / L)).pow(2)


# --------------------------------------------------------------------------------------------------------------------
# Additive PEs: a logit term b_h(i, j), built from per-token features.


class Additive(PositionalEncoding):
    """A PE that adds a logit term b_h(i, j), built from per-token features (see bias()). `fused`: the fused
    kernels that compute this PE's attention exactly, in order of preference (attention_path() takes the first that
    applies): "flex" (FlexAttention with pair() as the score_mod), "fla" (fla's forgetting attention), "grape_ap"
    (kernels/grape_ap.py)."""

    fused = ()

    def features(self, x, q, k, v, positions, cache):
        """Per-token quantities for the new tokens, laid out (B, H, T, ...): (q_feats, k_feats).
        q, k: QK-normed, un-rotated (B, T, H, D); v: (B, T, H, D); cache: this layer's cache or None."""
        return {}, {}

    def bias(self, q_feats, k_feats, q_pos, k_pos):
        """The logit term b_h(i, j) for the queries and keys given, as a fresh (B|1, H, Tq, Tk) fp32 tensor (callers
        may write into it). Called on slices: q_feats / q_pos for Tq consecutive queries, k_feats / k_pos for the
        keys 0 .. Tk-1, and the queries are always the last Tq of those positions (training: Tq = Tk; a block of
        the chunked path; decoding). Entries with key > query are ignored by the caller."""
        raise NotImplementedError


class PairwiseAdditive(Additive):
    """An additive PE whose b_h(i, j) is an elementwise function of a query's features, a key's features, the
    distance i - j and per-head constants: the separable biases (ALiBi, FoX, GRAPE-A). Its formula lives in
    pair(); bias() evaluates it on a (Tq, Tk) block by broadcasting, the FlexAttention path one score at a time."""

    fused = ("flex",)

    def pair(self, q, k, dist, head):
        """b for per-query values q[name] and per-key values k[name] (feature entries, broadcastable against each
        other and against dist = i - j in fp32); head(t) picks the current head's entry of an (H,) tensor."""
        raise NotImplementedError

    def bias(self, q_feats, k_feats, q_pos, k_pos):
        q = {name: t[..., :, None] for name, t in q_feats.items()}  # (B, H, Tq, 1)
        k = {name: t[..., None, :] for name, t in k_feats.items()}  # (B, H, 1, Tk)
        dist = (q_pos[:, None] - k_pos[None, :]).float()  # (Tq, Tk), exact integers
        b = self.pair(q, k, dist, lambda t: t[:, None, None])
        return b if b.dim() == 4 else b[None]  # (1, H, Tq, Tk) when no feature has a batch axis


class ALiBi(PairwiseAdditive):
    """ALiBi (Press et al., 2022): b_h(i, j) = -s_h (i - j), s_h = alibi_slopes(H). GRAPE paper §4.2: the exact
    GL(d+2) unipotent lift q^ = [q; 1; 0], k^ = [k; 0; 1], A_h = -s_h e_{d+2} e_{d+1}^T."""

    def __init__(self, cfg):
        super().__init__()
        self.register_buffer("slopes", torch.empty(cfg.n_head), persistent=False)

    @torch.no_grad()
    def reset_parameters(self):
        self.slopes.copy_(torch.tensor(alibi_slopes(self.slopes.numel())))

    def pair(self, q, k, dist, head):
        return -head(self.slopes) * dist


class FoX(PairwiseAdditive):
    """Forgetting Transformer (Lin et al., 2025): a data-dependent forget gate per token and head,
        log f_{t,h} = logsigmoid(w_h . x_t + c_h) (fp32),  c_t = sum_{l <= t} log f_l,
        b_h(i, j) = c_i - c_j = sum_{l=j+1..i} log f_l   (GRAPE-A with endpoint-independent edges, paper App. C).
    Gate: Linear(C -> H) with bias; weight by the global init, bias 0, so f ~ 0.5 at init. Decoding caches c_j.
    Numerics: |c| grows like 0.69 t at init, so c_i - c_j of two fp32 numbers near the diagonal would carry an
    absolute error ~ eps |c_i| (1e-4 at t = 4096; also in the reference's fused kernel). Here c is summed and kept in
    fp64 ((B, H, T): free), and bias() re-centres it on the first query r of the slice it is given before rounding:
    b = fp32(c_i - c_r) - fp32(c_j - c_r), whose error is ~ eps (|c_i - c_r| + |c_j - c_r|). Per block of the
    chunked path that is the decay across one block near the diagonal (~1e-5 at 128 queries of f = 1/2), not over
    the whole sequence as in the dense path (one slice, r = 0); far from the diagonal it is relative to |b|.
    (r precedes every query of the slice, so no query's bias depends on a later token, not even in rounding.)
    Features: c (B, H, T) fp64 for queries and keys (decoding caches the keys'), and log_f (B, H, T) fp32 for the
    queries, the per-step gate that fla's kernel takes (it sums its own fp32 cumsum); bias() never reads log_f."""

    own_init = ("fgate.bias",)
    global_init = ("fgate.weight",)
    fused = ("fla", "flex")

    def __init__(self, cfg):
        super().__init__()
        self.fgate = nn.Linear(cfg.n_embd, cfg.n_head, bias=True)

    @torch.no_grad()
    def reset_parameters(self):
        nn.init.zeros_(self.fgate.bias)

    def features(self, x, q, k, v, positions, cache):
        log_f = F.logsigmoid(at_least_fp32(self.fgate(x))).transpose(1, 2)  # (B, H, T)
        c = log_f.double().cumsum(-1)
        if cache is not None and "c" in cache.feats:
            c = c + cache.feats["c"][..., -1:]
        return {"c": c, "log_f": log_f}, {"c": c}

    def pair(self, q, k, dist, head):
        return q["c"] + -k["c"]  # c_i - c_j, negating the key operand: a broadcast sum's backward copies nothing

    def bias(self, q_feats, k_feats, q_pos, k_pos):
        ref = q_feats["c"][..., :1]  # the slice's first query: known to every row of it, so b stays causal
        dtype = torch.promote_types(self.fgate.weight.dtype, torch.float32)  # fp32 (fp64 for an fp64 model)
        centred = lambda feats: {"c": (feats["c"] - ref).to(dtype)}
        return super().bias(centred(q_feats), centred(k_feats), q_pos, k_pos)


class GrapeA(PairwiseAdditive):
    """Additive GRAPE with content gates (paper §4, eq. 4.6; reference llama-mha-grape-a-{query,key,querykey}gated):
        b_h(i, j) = -(i - j) * softplus(omega_h) * s_h * r_h(i, j),
        r = g_q(i) (gate "q"), g_k(j) (gate "k"), or g_q(i) + g_k(j) (gate "qk"),
        g_q(i) = softplus(q^_i . v^_h / sqrt(D)), g_k(j) = softplus(k^_j . u^_h / sqrt(D)),
    q^, k^ the QK-normed q, k; u^ = u / max(|u|, eps) (likewise v); s_h the ALiBi slopes (a fixed per-head multiplier
    the reference adds to the paper's omega). Init: softplus(omega) = 1, u, v ~ N(0, 1/D), so b ~ 0.69 x ALiBi
    (1.39 x for "qk") at init. Decoding caches g_k(j).
    Names follow the reference's (they are its state-dict keys): the parameter v (H, D) is the query gate's
    direction and u the key gate's; neither is related to the values v that features() is handed (and ignores).
    The gate is chosen by the subclass registered for each pos_encoding name (GrapeAQueryGated, ...)."""

    gate = None  # "q", "k" or "qk"
    own_init = ("omega", "u", "v")

    def __init__(self, cfg):
        super().__init__()
        if self.gate not in ("q", "k", "qk"):
            raise TypeError(f"{type(self).__name__}: GRAPE-A is built through a gated subclass (gate 'q', 'k' or "
                            f"'qk'), got gate {self.gate!r}")
        self.cfg = cfg
        H, D = cfg.n_head, cfg.head_dim
        self.omega = nn.Parameter(torch.empty(H))
        if "q" in self.gate:
            self.v = nn.Parameter(torch.empty(H, D))
        if "k" in self.gate:
            self.u = nn.Parameter(torch.empty(H, D))
        self.register_buffer("slopes", torch.empty(H), persistent=False)

    @torch.no_grad()
    def reset_parameters(self):
        cfg = self.cfg
        self.omega.fill_(inv_softplus(max(cfg.grape_a_omega_init, 1e-8)))
        std = cfg.grape_a_gate_init_std if cfg.grape_a_gate_init_std is not None else cfg.head_dim ** -0.5
        for name in ("u", "v"):
            if hasattr(self, name):
                nn.init.normal_(getattr(self, name), 0.0, std)
        self.slopes.copy_(torch.tensor(alibi_slopes(cfg.n_head)))

    def _gate(self, t, direction):
        if self.cfg.grape_a_gate_l2_norm:
            direction = F.normalize(at_least_fp32(direction), dim=-1, eps=self.cfg.grape_a_gate_l2_eps)
        dot = torch.einsum("bthd,hd->bht", at_least_fp32(t), at_least_fp32(direction))
        return F.softplus(dot / math.sqrt(self.cfg.head_dim))  # (B, H, T)

    def features(self, x, q, k, v, positions, cache):
        q_feats = {"g": self._gate(q, direction=self.v)} if "q" in self.gate else {}
        k_feats = {"g": self._gate(k, direction=self.u)} if "k" in self.gate else {}
        return q_feats, k_feats

    def pair(self, q, k, dist, head):
        # -kappa_h is folded into each gate's per-token rate before the rate meets the (Tq, Tk) distances
        kappa = -head(F.softplus(at_least_fp32(self.omega)) * self.slopes)
        rate = 0.0
        if "q" in self.gate:
            rate = rate + kappa * q["g"]
        if "k" in self.gate:
            rate = rate + kappa * k["g"]
        return rate * dist


class GrapeAQueryGated(GrapeA):
    """GRAPE-A with r = g_q(i) (reference llama-mha-grape-a-querygated)."""

    gate = "q"


class GrapeAKeyGated(GrapeA):
    """GRAPE-A with r = g_k(j) (reference llama-mha-grape-a-keygated)."""

    gate = "k"


class GrapeAQueryKeyGated(GrapeA):
    """GRAPE-A with r = g_q(i) + g_k(j) (reference llama-mha-grape-a-querykeygated)."""

    gate = "qk"


class _ReversedPathSum(torch.autograd.Function):
    """GRAPE-AP's path sum over edge scores e laid out with the keys in reverse order (see GrapeAP.bias):
        b = s * flip(cumsum(psi)),  psi = logsigmoid(e) with psi = 0 where `hidden` (the first hidden.size(-1)
        columns of each row; True = key after the query), all along the last axis.
    flip(cumsum(.)) is its own transpose, so the backward is the same scan:
        de = logsigmoid'(e) * hide(flip(cumsum(s * db))).
    Written out because autograd would run the scan's transpose as flip, reverse-cumsum (flip, cumsum, flip) and
    copy the gradient once more for the masked slice: three extra passes over a (B, H, Tq, Tk) tensor."""

    @staticmethod
    def forward(ctx, e, hidden, slopes):
        psi, buffer = torch.ops.aten.log_sigmoid_forward(e)
        psi[..., :hidden.size(-1)].masked_fill_(hidden, 0.0)
        ctx.save_for_backward(e, buffer, hidden, slopes)
        return psi.cumsum_(-1).flip(-1).mul_(slopes)

    @staticmethod
    def backward(ctx, d_b):
        e, buffer, hidden, slopes = ctx.saved_tensors
        d_psi = (d_b * slopes).cumsum_(-1).flip(-1)
        d_psi[..., :hidden.size(-1)].masked_fill_(hidden, 0.0)
        return torch.ops.aten.log_sigmoid_backward(d_psi, e, buffer), None, None


class GrapeAP(Additive):
    """Path-integral additive GRAPE (paper §5; reference llama-mha-grape-ap-v1):
        e_h(t, l)   = <p_{t,h}, R_l p^_{l,h}> / d_p             (query probe p_t, normalised rotated key probe)
        psi_h(t, l) = s_h * logsigmoid(e_h(t, l)) <= 0
        b_h(t, j)   = sum_{l=j+1..t} psi_h(t, l)                 (b(t, t) = 0; psi(t, t) enters every j < t)
    p = c_p(x) viewed (B, T, H, d_p) with d_p = grape_ap_p_head_dim (8), or the normed q / normed k / v when tied
    (then d_p = head_dim). p^ = p / rms(p) (no gain, eps = fp32 machine epsilon: the reference's eps=None in fp32;
    where its rms_norm runs in bf16 under autocast, that eps is bf16's 2^-7; here the probe stays fp32). R_l rotates
    every half-split plane of p^ by -l (base 1: all planes turn at 1 rad/token, key index l absolute). s_h = ALiBi
    slopes (fixed; the paper's alpha_h). Reference form: the query probe is raw; grape_ap_query_norm=True uses the
    paper's eq. 5.1 with both probes normalised. The bias depends on t through psi, so it is not a function of
    i - j; decoding caches the rotated key probes R_l p^_l and pays O(t) per step."""

    global_init = ("c_p.weight",)
    fused = ("grape_ap",)

    @classmethod
    def check(cls, cfg):
        if cfg.grape_ap_tie == "none" and (cfg.grape_ap_p_head_dim <= 0 or cfg.grape_ap_p_head_dim % 2):
            raise ValueError(f"GPTConfig.grape_ap_p_head_dim must be a positive even int, "
                             f"got {cfg.grape_ap_p_head_dim}")

    def __init__(self, cfg):
        super().__init__()
        self.cfg, self.tie = cfg, cfg.grape_ap_tie
        self.p_dim = cfg.grape_ap_p_head_dim if self.tie == "none" else cfg.head_dim
        if self.tie == "none":
            self.c_p = nn.Linear(cfg.n_embd, cfg.n_head * self.p_dim, bias=False)
        self.register_buffer("slopes", torch.empty(cfg.n_head), persistent=False)

    @torch.no_grad()
    def reset_parameters(self):
        self.slopes.copy_(torch.tensor(alibi_slopes(self.cfg.n_head)))

    def features(self, x, q, k, v, positions, cache):
        B, T, _ = x.shape
        if self.tie == "none":
            p = self.c_p(x).view(B, T, self.cfg.n_head, self.p_dim)
        else:
            p = {"q": q, "k": k, "v": v}[self.tie]
        p = at_least_fp32(p)
        eps = torch.finfo(torch.float32).eps
        p_key = rms_norm(p, eps=eps)
        p_query = p_key if self.cfg.grape_ap_query_norm else p
        phi = positions.to(p.dtype)[None, :, None, None].expand(1, T, 1, self.p_dim // 2)  # base 1: angle = l
        p_key = rotate_half_split(p_key, phi.cos(), phi.sin())
        return {"p": p_query.transpose(1, 2)}, {"p": p_key.transpose(1, 2)}

    def bias(self, q_feats, k_feats, q_pos, k_pos):
        """The suffix sum over l in (j, t] as one forward cumsum: the edge scores are computed against the keys in
        reverse order shifted by one, column m holding key l = k_end - m (m = 0: a zero probe at l = k_end, which
        is after every query and so masked), so that cumsum(psi)[m] = sum_{l >= k_end - m} psi = b(t, k_end-1-m)
        and one flip restores key order. No "row total - prefix" cancellation; psi(t, l > t) = 0 only needs the
        first Tq columns (the queries are the last Tq positions)."""
        Tq = q_pos.numel()
        p_key = k_feats["p"]
        p_key = torch.cat((torch.zeros_like(p_key[:, :, :1]), p_key[:, :, 1:].flip(2)), dim=2)
        l_pos = k_pos[-1] + 1 - torch.arange(Tq, device=k_pos.device)  # the first Tq columns' key positions
        with torch.autocast(p_key.device.type, enabled=False):  # fp32 scores: the scan must not run in bf16
            e = (q_feats["p"] / self.p_dim) @ p_key.transpose(-1, -2)  # (B, H, Tq, Tk), keys reversed
        return _ReversedPathSum.apply(e, causal_mask(q_pos, l_pos), self.slopes[:, None, None].to(e.dtype))


# The registry of PEs: pos_encoding name -> class. The name lists below derive from it (in this order, which error
# messages and benchmark tables follow), so a new PE is its class (formula, check, init declaration) plus one entry.
PE_CLASSES = {
    "rope": RoPE, "grape_m": GrapeM, "grape_m_ctx": GrapeMCtx, "grape_m_rank2": GrapeMRank2,
    "grape_m_basis": GrapeMBasis, "grape_m_mix": GrapeMMix, "pope": PoPE, "rope_id": RoPEID,
    "alibi": ALiBi, "fox": FoX, "grape_a_q": GrapeAQueryGated, "grape_a_k": GrapeAKeyGated,
    "grape_a_qk": GrapeAQueryKeyGated, "grape_ap": GrapeAP,
}
ROTARY_PES = tuple(name for name, cls in PE_CLASSES.items() if issubclass(cls, Rotary))
ADDITIVE_PES = tuple(name for name, cls in PE_CLASSES.items() if issubclass(cls, Additive))
SCALABLE_ROTARY_PES = tuple(name for name in ROTARY_PES if PE_CLASSES[name].rope_scalable)  # rope_scaling's PEs


def build_pe(cfg):
    """(rotary module or None, additive module or None) for cfg.pos_encoding, each initialised right after it is
    constructed (the order of random draws every model of this code has been initialised with)."""
    def build(name):
        if name is None:
            return None
        pe = PE_CLASSES[name](cfg)
        pe.reset_parameters()
        return pe
    rotary, additive = split_pos_encoding(cfg.pos_encoding)
    return build(rotary), build(additive)


# --------------------------------------------------------------------------------------------------------------------
# KV cache


class LayerCache:
    """One layer's decoding state: k, v (B, H, T, D) after PE and QK-norm; `feats`, the additive PE's per-key
    features (B, H, T, ...); `state`, running quantities overwritten every step (KV-shift's last un-shifted k and v,
    GRAPE-M-ctx's total phase). Keys always start at position 0."""

    def __init__(self):
        self.k = self.v = None
        self.feats, self.state = {}, {}

    def extend(self, k, v, feats):
        cat = lambda old, new: new if old is None else torch.cat((old, new), dim=2)
        self.k, self.v = cat(self.k, k), cat(self.v, v)
        self.feats = {name: cat(self.feats.get(name), t) for name, t in feats.items()}
        return self.k, self.v, self.feats


class KVCache:
    def __init__(self, n_layer):
        self.layers = [LayerCache() for _ in range(n_layer)]
        self.length = 0  # tokens seen so far = absolute position of the next token


# --------------------------------------------------------------------------------------------------------------------
# Attention paths of the additive PEs


FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_log = logging.getLogger(__name__)
_logged = set()  # the fallback messages logged so far: each once per process


def _head_dim_unsupported(kernel, head_dim):
    """Why `kernel` cannot take this head dim, or None."""
    if kernel == "flex" and not (16 <= head_dim <= 256 and head_dim & (head_dim - 1) == 0):
        return f"head dim {head_dim} (FlexAttention: a power of two in [16, 256])"
    if kernel == "fla" and head_dim > 256:
        return f"head dim {head_dim} (fla: at most 256)"
    if kernel == "grape_ap" and head_dim > 256:
        return f"head dim {head_dim} (kernels/grape_ap.py: at most 256)"
    return None


def _kernel_unavailable(kernel):
    """None if `kernel`'s code can run in this process, else why not (FlexAttention is torch's own)."""
    if kernel == "flex":
        return None
    if fused_attention is None:
        return "fused_attention.py is not importable (an export ships model.py and chunked_attention.py only)"
    return fused_attention.unavailable(kernel)


def attention_path(impl, fused, device_type, dtype, head_dim, Tq, Tk, unavailable=_kernel_unavailable):
    """(path, why) for an additive PE's attention: path is "chunked", "dense" or a fused kernel of `fused` (the
    PE's, in its order of preference: "flex", "fla", "grape_ap"); why is None, or the reason no fused kernel was
    taken where impl allowed one (path is then "chunked").
        impl "chunked" / "dense": that path;  "auto": the first kernel of `fused` that applies;
        impl "flex": "flex" if it is in `fused` and applies.
    A kernel applies on CUDA to a full sequence (Tq == Tk; cached decoding, Tq < Tk, is chunked) for q, k, v in
    fp16 / bf16 / fp32, within its head-dim limits (_head_dim_unsupported), with its package importable
    (unavailable(kernel) -> None, else the reason). Every device condition of the model's attention lives here:
    attend() passes the facts of its tensors, the tests made-up ones."""
    if impl in ("chunked", "dense"):
        return impl, None
    kernels = tuple(fused) if impl == "auto" else tuple(kernel for kernel in fused if kernel == "flex")
    if not kernels:
        return "chunked", None
    if device_type != "cuda":
        return "chunked", f"device {device_type}: the fused kernels ({', '.join(kernels)}) need CUDA"
    if Tq != Tk:
        return "chunked", f"cached decoding ({Tq} queries, {Tk} keys)"
    if dtype not in FUSED_DTYPES:
        return "chunked", f"dtype {dtype}: the fused kernels take fp16, bf16 or fp32"
    reasons = []
    for kernel in kernels:
        why = _head_dim_unsupported(kernel, head_dim) or unavailable(kernel)
        if why is None:
            return kernel, None
        reasons.append(f"{kernel}: {why}")
    return "chunked", "; ".join(reasons)


def note_fallback(pe, why, warn):
    """Log that `pe` takes the chunked path because of `why`, once per process for each (pe, why): a warning where
    it costs speed (warn), else at INFO."""
    message = f"attention: {pe} takes the chunked path ({why})"
    if message not in _logged:  # read by torch.compile as a guard: a compiled graph never reaches the logger again
        _logged.add(message)
        _emit(message, warn)


@torch.compiler.disable
def _emit(message, warn):
    """The logger call, outside torch.compile's graphs (dynamo does not trace logging.Logger methods)."""
    (_log.warning if warn else _log.info)(message)


# --------------------------------------------------------------------------------------------------------------------
# Transformer


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        C, H, D = cfg.n_embd, cfg.n_head, cfg.head_dim
        self.n_head, self.head_dim = H, D
        self.scale = 1.0 / math.sqrt(D)  # the logit scale, also for PoPE's 2D-wide q and k
        self.attn_impl, self.attn_chunk_size = cfg.attn_impl, cfg.attn_chunk_size
        self.c_q = nn.Linear(C, H * D, bias=False)
        self.c_k = ShiftLinear(C, H * D, H) if cfg.kv_shift else nn.Linear(C, H * D, bias=False)
        self.c_v = ShiftLinear(C, H * D, H) if cfg.kv_shift else nn.Linear(C, H * D, bias=False)
        self.c_proj = nn.Linear(H * D, C, bias=False)
        self.q_rms = RMSNorm(D, cfg.norm_eps) if cfg.qk_norm else nn.Identity()
        self.k_rms = RMSNorm(D, cfg.norm_eps) if cfg.qk_norm else nn.Identity()
        self.rotary, self.additive = build_pe(cfg)
        self.norm_before_rotary = cfg.qk_norm_before_rotary or getattr(self.rotary, "norm_first", False)

    def _project_kv(self, proj, x, cache, state_name):
        if not isinstance(proj, ShiftLinear):
            return proj(x)
        out, last = proj(x, None if cache is None else cache.state.get(state_name))
        if cache is not None:
            cache.state[state_name] = last
        return out

    def qkv(self, x, positions, cache=None):
        """Projections with the PE applied: q, k, v as (B, T, H, D) and the additive PE's (q_feats, k_feats)."""
        B, T, _ = x.shape
        heads = (B, T, self.n_head, self.head_dim)
        q = self.c_q(x).view(heads)
        k = self._project_kv(self.c_k, x, cache, "k_shift").view(heads)
        v = self._project_kv(self.c_v, x, cache, "v_shift").view(heads)
        if self.rotary is None or self.norm_before_rotary:
            q, k = self.q_rms(q), self.k_rms(k)
            feats = self.additive.features(x, q, k, v, positions, cache) if self.additive else ({}, {})
            if self.rotary is not None:
                q, k = self.rotary(q, k, x, positions, cache)
        else:  # reference order: rotate, then normalise; additive features read the un-rotated normed q, k
            feats = ({}, {})
            if self.additive is not None:
                feats = self.additive.features(x, self.q_rms(q), self.k_rms(k), v, positions, cache)
            q, k = self.rotary(q, k, x, positions, cache)
            q, k = self.q_rms(q), self.k_rms(k)
        if self.rotary is not None:  # a temperature (YaRN, RoPE-ID) multiplies the logits: after the norm
            scale = self.rotary.query_scale(positions)
            if isinstance(scale, torch.Tensor):
                q = (q * scale.to(q.device)[None, :, None, None]).to(q.dtype)
            elif scale != 1.0:
                q = q * scale
        return q, k, v, feats

    def attend(self, q, k, v, q_feats, k_feats, q_pos):
        """Causal softmax attention over (B, H, T, D) tensors; the queries are the last Tq of Tk positions (keys at
        0 .. Tk-1). The single entry point for every PE. Without an additive PE: SDPA's causal kernel. With one,
        the path is attention_path(attn_impl, the PE's fused kernels, this call's device, dtype, head dim, Tq, Tk):
            "chunked": blocks of attn_chunk_size queries, each with its (B|1, H, chunk, keys so far) bias,
                recomputed in the backward (chunked_attention.py): nothing T x T exists, forward or backward;
            "dense": the whole (B|1, H, Tq, Tk) bias at once (the reference the chunked path is tested against);
            "flex": a PairwiseAdditive's pair() as a compiled FlexAttention score_mod (CUDA, Tq = Tk);
            "fla": FoX through fla's parallel_forgetting_attn, fed the per-step gate log_f (CUDA, Tq = Tk);
            "grape_ap": GRAPE-AP through kernels/grape_ap.py, fed the probes and slopes (CUDA, Tq = Tk).
        A fused path that does not apply falls back to "chunked", logged once per reason (note_fallback). The fp32
        bias of the chunked and dense paths reaches SDPA in q's dtype (bf16 under autocast, like the reference)."""
        Tq, Tk, scale = q.size(2), k.size(2), self.scale
        if self.additive is None:
            if Tq == Tk:
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
            if Tq == 1:
                return F.scaled_dot_product_attention(q, k, v, scale=scale)
            k_pos = torch.arange(Tk, device=q.device)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=~causal_mask(q_pos, k_pos), scale=scale)
        path, why = attention_path(self.attn_impl, self.additive.fused, q.device.type, q.dtype, q.size(-1), Tq, Tk)
        if why is not None:  # a warning where it costs speed: on CUDA, for a full sequence
            note_fallback(type(self.additive).__name__, why, warn=q.is_cuda and Tq == Tk)
        if path == "flex":
            return flex_pairwise_attention(q, k, v, q_feats, k_feats, self.additive.pair, scale=scale)
        if path == "fla":
            return fused_attention.forgetting_attention(q, k, v, q_feats["log_f"], scale)
        if path == "grape_ap":
            return fused_attention.grape_ap_attention(q, k, v, q_feats["p"], k_feats["p"], self.additive.slopes,
                                                      scale)
        if path == "chunked":
            params = [p for p in self.additive.parameters() if p.requires_grad]
            return chunked_bias_attention(q, k, v, q_feats, k_feats, self.additive.bias, params, self.attn_chunk_size,
                                          scale=scale)
        k_pos = torch.arange(Tk, device=q.device)
        bias = self.additive.bias(q_feats, k_feats, q_pos, k_pos)
        bias = bias.masked_fill(causal_mask(q_pos, k_pos), float("-inf"))
        # SDPA takes the mask in q's dtype (under autocast the reference's fp32 bias is read as bf16 too).
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=scale)

    def forward(self, x, positions, cache=None):
        B, T, _ = x.shape
        q, k, v, (q_feats, k_feats) = self.qkv(x, positions, cache)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            k, v, k_feats = cache.extend(k, v, k_feats)
        y = self.attend(q, k, v, q_feats, k_feats, positions)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        hidden = 8 * cfg.n_embd // 3  # floor(8C/3): 2730 (medium), 3413 (large)
        self.c_fc1 = nn.Linear(cfg.n_embd, hidden, bias=False)  # gate branch
        self.c_fc2 = nn.Linear(cfg.n_embd, hidden, bias=False)
        self.c_proj = nn.Linear(hidden, cfg.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.silu(self.c_fc1(x)) * self.c_fc2(x))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, positions, cache=None):
        x = x + self.attn(self.ln_1(x), positions, cache)
        return x + self.mlp(self.ln_2(x))


def enclosing_declarer(name, declarers):
    """The prefix in declarers of the module that holds `name` (a dotted parameter or module name), or None."""
    return next((prefix for prefix in declarers if name.startswith(prefix + ".")), None)


class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
            h=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)),
            ln_f=RMSNorm(cfg.n_embd, cfg.norm_eps),
        ))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied: one Parameter
        self.init_weights()

    def init_plan(self):
        """{parameter name: "own" | "global"} for every parameter of the model, the contract init_weights follows.
        A PE (PositionalEncoding) or an RMSNorm declares all of its parameters, those of its submodules included, in
        own_init (set by its reset_parameters) or global_init; elsewhere the weight of an nn.Linear or nn.Embedding
        is "global". Raises ValueError naming any parameter that nothing declares, or that is declared twice, so
        that a new parameter never gets an init nobody chose."""
        plan, declarers = {}, {}
        for prefix, module in self.named_modules():
            if enclosing_declarer(prefix, declarers) is not None:
                continue  # inside a PE or norm, whose declaration covers its submodules
            if isinstance(module, (PositionalEncoding, RMSNorm)):
                declarers[prefix] = module
                twice = set(module.own_init) & set(module.global_init)
                if twice:
                    raise ValueError(f"{type(module).__name__} declares {sorted(twice)} in both own_init and "
                                     f"global_init; each parameter has one init")
                plan.update((f"{prefix}.{name}", "own") for name in module.own_init)
                plan.update((f"{prefix}.{name}", "global") for name in module.global_init)
            elif isinstance(module, (nn.Linear, nn.Embedding)):
                plan[f"{prefix}.weight"] = "global"
        for name, _ in self.named_parameters():
            if name not in plan:
                owner = enclosing_declarer(name, declarers)
                if owner is None:
                    hint = "outside a PE only RMSNorm gains and nn.Linear / nn.Embedding weights have one"
                else:
                    hint = (f"list {name[len(owner) + 1:]!r} in {type(declarers[owner]).__name__}.own_init (set by "
                            f"its reset_parameters) or .global_init (drawn by GPT.init_weights)")
                raise ValueError(f"GPT.init_weights: parameter {name!r} has no declared init; {hint}")
        return {name: plan[name] for name, _ in self.named_parameters()}

    @torch.no_grad()
    def init_weights(self):
        """The reference init (GRAPE §1.6), by init_plan(). Every module that declares an init (PEs, RMSNorm) is
        reset in module order (norm gains 1, FoX gate bias 0, GRAPE spectra and gates as documented per class;
        GRAPE-A's gates draw from the RNG here), then every "global" parameter, in parameter order, is drawn from
        N(0, std^2): the tied embedding 0.02; the residual outputs (attn.c_proj, mlp.c_proj) sigma_h / sqrt(n_layer);
        everything else sigma_h = 0.5 / sqrt(n_embd). Safe to call again (e.g. after meta-device construction)."""
        plan = self.init_plan()  # first: a model with an undeclared parameter is refused before anything changes
        cfg = self.config
        sigma_h = cfg.hidden_init_std_factor / math.sqrt(cfg.n_embd)
        sigma_o = sigma_h / math.sqrt(cfg.n_layer)
        for module in self.modules():
            if isinstance(module, (PositionalEncoding, RMSNorm)):
                module.reset_parameters()
        for name, p in self.named_parameters():
            if plan[name] != "global":
                continue
            if name == "transformer.wte.weight":
                std = cfg.embedding_init_std
            elif name.endswith("attn.c_proj.weight") or name.endswith("mlp.c_proj.weight"):
                std = sigma_o
            else:
                std = sigma_h
            nn.init.normal_(p, 0.0, std)

    def num_params(self):
        """Number of parameters, the tied embedding counted once."""
        return sum(p.numel() for p in self.parameters())

    def new_cache(self):
        return KVCache(self.config.n_layer)

    def forward(self, idx, targets=None, cache=None, all_logits=False):
        """idx (B, T) token ids -> (logits, loss). With targets: logits for every position (fp32) and the mean
        cross-entropy (targets == -1 ignored). Without: logits of the last position only, (B, 1, V), unless
        all_logits. With a KVCache the tokens continue the cached sequence (positions cache.length ...)."""
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        positions = torch.arange(start, start + T, device=idx.device)
        x = self.transformer.wte(idx)
        for i, block in enumerate(self.transformer.h):
            x = block(x, positions, None if cache is None else cache.layers[i])
        x = self.transformer.ln_f(x)
        if cache is not None:
            cache.length += T
        if targets is not None:
            logits = at_least_fp32(self.lm_head(x))
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
            return logits, loss
        logits = at_least_fp32(self.lm_head(x if all_logits else x[:, -1:]))
        return logits, None

    def optimizer_param_groups(self, weight_decay):
        """The reference's AdamW groups: RMSNorm gains without weight decay, every other parameter with it."""
        no_decay = {id(m.weight) for m in self.modules() if isinstance(m, RMSNorm)}
        params = list(self.parameters())
        return [dict(params=[p for p in params if id(p) not in no_decay], weight_decay=weight_decay),
                dict(params=[p for p in params if id(p) in no_decay], weight_decay=0.0)]

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=0.0, use_cache=True, top_k=None):
        """Continue idx (B, T) by max_new_tokens tokens. temperature 0 is greedy decoding. With use_cache the prompt
        is prefilled once and each new token costs one incremental step; without, every step re-runs the full
        forward (the two give the same tokens)."""
        cache = self.new_cache() if use_cache else None
        logits, _ = self(idx, cache=cache)
        for step in range(max_new_tokens):
            logits = logits[:, -1, :]
            if temperature == 0.0:
                next_id = logits.argmax(-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                next_id = torch.multinomial(F.softmax(logits, dim=-1), 1)
            idx = torch.cat((idx, next_id), dim=1)
            if step + 1 < max_new_tokens:
                logits, _ = self(next_id, cache=cache) if use_cache else self(idx)
        return idx
