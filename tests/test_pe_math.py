"""The positional encodings against their mathematical definitions (GRAPE paper, arXiv 2512.07805, and the papers of
RoPE, ALiBi and FoX), each computed here independently of model.py with explicit vectors and matrices in fp64."""

import math

import pytest
import torch
import torch.nn.functional as F

from helpers import (LAYER_BATCH, LAYER_LENGTH, double_model, half_split_generator, layer_inputs, lower, scores,
                     tiny_config)
from model import GPT, GPTConfig, LayerCache, ShiftLinear, alibi_slopes

B, T = LAYER_BATCH, LAYER_LENGTH  # the shape of layer_inputs


def lift(q, k, d):
    """GRAPE-A's homogeneous lift (paper §4.2): q^ = [q / sqrt(d); 1; 0], k^ = [k; 0; 1] in R^(d+2).
    (The 1/sqrt(d) of the content term is folded into q so that lifted dot products are the logits.)"""
    one, zero = torch.ones_like(q[..., :1]), torch.zeros_like(q[..., :1])
    return torch.cat((q / math.sqrt(d), one, zero), -1), torch.cat((k, zero, one), -1)


def unit(n, row, col):
    m = torch.zeros(n, n, dtype=torch.float64)
    m[row, col] = 1.0
    return m


# ---------------------------------------------------------------------------------------------------------- plumbing


@pytest.mark.parametrize("pe", ["rope", "alibi", "fox", "grape_a_qk", "grape_ap", "grape_m_ctx+grape_a_k"])
def test_attention_is_softmax_of_these_scores(pe):
    """The single attention entry point computes softmax(<q, k>/sqrt(D) + b) V: the bias is added after scaling."""
    model = double_model(pe, kv_shift=True)
    attn = model.transformer.h[0].attn
    x, pos = layer_inputs(model)
    _, _, v, _ = attn.qkv(x, pos)
    y = torch.softmax(scores(attn, x, pos), -1) @ v.transpose(1, 2)
    expected = attn.c_proj(y.transpose(1, 2).reshape(B, T, -1))
    torch.testing.assert_close(attn(x, pos), expected, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------------------------------- ALiBi


def test_alibi_slopes():
    assert alibi_slopes(8) == [2.0 ** -i for i in range(1, 9)]
    expected_10 = [2.0 ** -i for i in range(1, 9)] + [2 ** -0.5, 2 ** -1.5]
    assert alibi_slopes(10) == pytest.approx(expected_10, rel=1e-12)
    assert alibi_slopes(12) == pytest.approx([2.0 ** -i for i in range(1, 9)] + [2 ** -(i + 0.5) for i in range(4)])
    assert alibi_slopes(24) == pytest.approx([2 ** (-0.5 * i) for i in range(1, 17)]
                                             + [2 ** -(0.25 + 0.5 * i) for i in range(8)])


def test_alibi_equals_its_gl_d2_unipotent_lift():
    """ALiBi (GRAPE §4.2): A_h = -s_h e_{d+2} e_{d+1}^T, G(n) = exp(n A_h); q~_i = G(i) q^_i, k~_j = G(j)^-T k^_j
    gives q~_i . k~_j = q_i . k_j / sqrt(d) - s_h (i - j)."""
    model = double_model("alibi")
    attn = model.transformer.h[0].attn
    x, pos = layer_inputs(model)
    q, k, _, _ = attn.qkv(x, pos)
    D, H = q.size(-1), q.size(-2)
    lifted = torch.empty(B, H, T, T, dtype=torch.float64)
    for h, slope in enumerate(alibi_slopes(H)):
        A = -slope * unit(D + 2, D + 1, D)
        G = torch.stack([torch.linalg.matrix_exp(n * A) for n in range(T)])  # (T, d+2, d+2)
        qh, kh = lift(q[:, :, h], k[:, :, h], D)
        q_t = torch.einsum("tab,ntb->nta", G, qh)
        k_t = torch.einsum("tba,ntb->nta", torch.linalg.inv(G), kh)  # G^-T k^
        lifted[:, h] = q_t @ k_t.transpose(-1, -2)
    torch.testing.assert_close(lower(scores(attn, x, pos)), lower(lifted), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------- FoX


def test_fox_equals_grape_a_path_product():
    """FoX as GRAPE-A (GRAPE App. C): per-link unipotent factors H(l) = I + log f_l E, E = e_{d+2} e_{d+1}^T;
    G(i) = H(0) H(1) ... H(i); scoring with the paired inverse-transpose gives q.k/sqrt(d) + sum_{l=j+1..i} log f_l."""
    model = double_model("fox")
    attn = model.transformer.h[0].attn
    x, pos = layer_inputs(model)
    q, k, _, _ = attn.qkv(x, pos)
    D, H = q.size(-1), q.size(-2)
    gate = attn.additive.fgate
    log_f = F.logsigmoid(x @ gate.weight.T + gate.bias)  # (B, T, H), from the definition
    E = unit(D + 2, D + 1, D)
    lifted = torch.empty(B, H, T, T, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            G, path = [], torch.eye(D + 2, dtype=torch.float64)
            for t in range(T):
                path = path @ (torch.eye(D + 2, dtype=torch.float64) + log_f[b, t, h] * E)
                G.append(path)
            G = torch.stack(G)
            qh, kh = lift(q[b, :, h], k[b, :, h], D)
            q_t = torch.einsum("tab,tb->ta", G, qh)
            k_t = torch.einsum("tba,tb->ta", torch.linalg.inv(G), kh)
            lifted[b, h] = q_t @ k_t.T
    torch.testing.assert_close(lower(scores(attn, x, pos)), lower(lifted), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------- GRAPE-A


@pytest.mark.parametrize("gate", ["q", "k", "qk"])
def test_grape_a_equals_eq_4_6_via_its_lift(gate):
    """GRAPE-A-QK (eq. 4.6) and its one-gate forms: per pair, A_ij = -Lambda_ij A_0 with A_0 = e_{d+2} e_{d+1}^T and
    Lambda_ij = softplus(q^_i.v^/sqrt(d)) + softplus(k^_j.u^/sqrt(d)); G(m) = exp(m w A_ij), m = j - i; the score
    q^^T G(m)^-T k^ equals q.k/sqrt(d) + (j - i) w Lambda_ij, with w = softplus(omega_h) * s_h in the code."""
    model = double_model(f"grape_a_{gate}")
    attn = model.transformer.h[0].attn
    pe = attn.additive
    x, pos = layer_inputs(model)
    q, k, _, _ = attn.qkv(x, pos)
    D, H = q.size(-1), q.size(-2)
    A0 = unit(D + 2, D + 1, D)
    slopes = alibi_slopes(H)
    lifted = torch.full((B, H, T, T), float("-inf"), dtype=torch.float64)
    for h in range(H):
        w = F.softplus(pe.omega[h]) * slopes[h]
        lam_q = F.softplus(q[:, :, h] @ (pe.v[h] / pe.v[h].norm()) / math.sqrt(D)) if "q" in gate else 0 * q[:, :, h, 0]
        lam_k = F.softplus(k[:, :, h] @ (pe.u[h] / pe.u[h].norm()) / math.sqrt(D)) if "k" in gate else 0 * k[:, :, h, 0]
        qh, kh = lift(q[:, :, h], k[:, :, h], D)
        for b in range(B):
            for i in range(T):
                for j in range(i + 1):
                    G = torch.linalg.matrix_exp((j - i) * w * -(lam_q[b, i] + lam_k[b, j]) * A0)
                    lifted[b, h, i, j] = qh[b, i] @ torch.linalg.inv(G).T @ kh[b, j]
    torch.testing.assert_close(lower(scores(attn, x, pos)), lower(lifted), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------- GRAPE-AP


@pytest.mark.parametrize("tie,query_norm", [("none", False), ("none", True), ("q", False), ("k", False),
                                            ("v", True)])
def test_grape_ap_bias_is_the_explicit_path_sum(tie, query_norm):
    """GRAPE-AP (§5, reference form): b_h(t, j) = sum_{l=j+1..t} s_h logsigmoid(<p_t, R_l p^_l> / d_p), R_l = exp(l J),
    p^ = p / rms(p); with query_norm the query probe is normalised too (paper eq. 5.1)."""
    model = double_model("grape_ap", kv_shift=True, grape_ap_tie=tie, grape_ap_query_norm=query_norm)
    attn = model.transformer.h[0].attn
    pe = attn.additive
    x, pos = layer_inputs(model)
    q, k, v, (q_feats, k_feats) = attn.qkv(x, pos)
    H = q.size(-2)
    p = {"none": lambda: (x @ pe.c_p.weight.T).view(B, T, H, -1), "q": lambda: q, "k": lambda: k,
         "v": lambda: v}[tie]()
    d_p = p.size(-1)
    assert d_p == (8 if tie == "none" else model.config.head_dim)
    eps = torch.finfo(torch.float32).eps
    p_hat = p / torch.sqrt(p.pow(2).mean(-1, keepdim=True) + eps)
    p_query = p_hat if query_norm else p
    J = half_split_generator(torch.ones(d_p // 2))
    R = torch.stack([torch.linalg.matrix_exp(l * J) for l in range(T)])
    slopes = alibi_slopes(H)
    expected = torch.zeros(B, H, T, T, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for t in range(T):
                for j in range(t + 1):
                    expected[b, h, t, j] = sum(
                        slopes[h] * F.logsigmoid(p_query[b, t, h] @ (R[l] @ p_hat[b, l, h]) / d_p)
                        for l in range(j + 1, t + 1))
    got = pe.bias(q_feats, k_feats, pos, pos)
    torch.testing.assert_close(lower(got), lower(expected), rtol=1e-12, atol=1e-12)


def test_grape_ap_at_init_is_about_0_69_alibi():
    """Reference note: with p ~ N(0, 0.25) the edge scores are small, psi ~ s_h log(1/2) and b ~ 0.69 x ALiBi."""
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=1, n_head=8, n_embd=256, head_dim=32, vocab_size=64, pos_encoding="grape_ap")
    attn = GPT(cfg).transformer.h[0].attn
    x = F.rms_norm(torch.randn(1, 64, 256), (256,))
    pos = torch.arange(64)
    _, _, _, (qf, kf) = attn.qkv(x, pos)
    b = attn.additive.bias(qf, kf, pos, pos)
    alibi = -torch.tensor(alibi_slopes(8))[:, None, None] * (pos[:, None] - pos[None, :]).clamp(min=0)
    ratio = lower(b[0])[..., 1:] / lower(alibi)[..., 1:]
    ratio = ratio[torch.isfinite(ratio)]
    assert abs(ratio.mean().item() - math.log(2)) < 0.02


# ---------------------------------------------------------------------------------------------------------- GRAPE-M


@pytest.mark.parametrize("pe,share", [("rope", True), ("grape_m", True), ("grape_m", False)])
def test_rotary_is_exp_of_its_generator(pe, share):
    """Multiplicative GRAPE (§2-3): q~_t = exp(t L) q_t with L = sum_m theta_m L_m on the canonical planes; for RoPE
    theta = base^(-2m/d), for GRAPE-M the learned spectrum (shared or per head)."""
    model = double_model(pe, grape_share_across_heads=share)
    rot = model.transformer.h[0].attn.rotary
    D, H = model.config.head_dim, model.config.n_head
    x, pos = layer_inputs(model)
    q = torch.randn(B, T, H, D, dtype=torch.float64)
    got, _ = rot(q, q, x, pos)
    freqs = rot.frequencies().double() if pe == "grape_m" else 1.0 / 10000 ** (torch.arange(0, D, 2).double() / D)
    freqs = freqs.expand(H, D // 2)
    for h in range(H):
        L = half_split_generator(freqs[h])
        for t in range(T):
            torch.testing.assert_close(got[:, t, h], q[:, t, h] @ torch.linalg.matrix_exp(t * L).T,
                                       rtol=1e-10, atol=1e-10)


def test_grape_m_ctx_is_exp_of_its_generator_at_the_contextual_phase():
    """GRAPE-M-ctx: q~_t = exp(Phi_t L) q_t with Phi_t = sum_{tau < t} sigmoid((w.x_tau + b) / 16)."""
    model = double_model("grape_m_ctx")
    rot = model.transformer.h[0].attn.rotary
    D, H = model.config.head_dim, model.config.n_head
    x, pos = layer_inputs(model)
    omega = torch.sigmoid((x @ rot.omega_proj.weight.T + rot.omega_proj.bias) / 16.0)[..., 0]  # (B, T)
    phase = torch.cumsum(omega, 1) - omega
    q = torch.randn(B, T, H, D, dtype=torch.float64)
    got, _ = rot(q, q, x, pos)
    L = half_split_generator(rot.log_freq.exp())
    for b in range(B):
        for t in range(T):
            torch.testing.assert_close(got[b, t], q[b, t] @ torch.linalg.matrix_exp(phase[b, t] * L).T,
                                       rtol=1e-10, atol=1e-10)


def test_grape_m_ctx_phase_at_init():
    """omega_t = sigmoid(softplus^-1(1e-3) / 16) = 0.39372 for every token at init (the gate weight is 0)."""
    model = GPT(tiny_config("grape_m_ctx"))
    rot = model.transformer.h[0].attn.rotary
    phase = rot.phase(torch.randn(1, 10, 64))
    torch.testing.assert_close(phase[0, :, 0], 0.393720 * torch.arange(10.0), rtol=1e-5, atol=1e-5)


def test_rope_equals_grape_m_at_init():
    """GRAPE-M with canonical planes and the log-uniform spectrum is exactly RoPE (Prop. 3.1)."""
    torch.manual_seed(0)
    rope = GPT(tiny_config("rope"))
    grape = GPT(tiny_config("grape_m"))
    missing, unexpected = grape.load_state_dict(rope.state_dict(), strict=False)
    assert all(name.endswith("rotary.log_freq") for name in missing) and not unexpected
    rot = grape.transformer.h[0].attn.rotary
    D = grape.config.head_dim
    torch.testing.assert_close(rot.frequencies(), 1.0 / 10000 ** (torch.arange(0, D, 2).float() / D),
                               rtol=2e-7, atol=0)
    idx = torch.randint(0, 97, (2, 64))
    with torch.no_grad():
        a, _ = rope(idx, all_logits=True)
        b, _ = grape(idx, all_logits=True)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------------------- relative law


@pytest.mark.parametrize("pe", ["rope", "grape_m", "alibi", "grape_a_qk", "rope+alibi", "grape_m+grape_a_k",
                                "grape_m_rank2", "grape_m_basis", "grape_m_mix", "pope", "pope+fox",
                                "grape_m_basis+grape_a_qk"])
def test_relative_law_with_unit_norm_gains(pe):
    """Shifting every position by a constant leaves the logits unchanged (QK-norm gains at 1, reference order)."""
    model = double_model(pe)
    attn = model.transformer.h[0].attn
    for norm in (attn.q_rms, attn.k_rms):
        torch.nn.init.ones_(norm.weight)
    x, pos = layer_inputs(model)
    torch.testing.assert_close(lower(scores(attn, x, pos + 1000)), lower(scores(attn, x, pos)), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("pe", ["rope", "grape_m"])
def test_relative_law_needs_norm_before_rotation_once_gains_move(pe):
    """Reference pitfall: with learned QK-norm gains, normalising after rotating breaks the relative law;
    qk_norm_before_rotary=True keeps it exact."""
    shifted = {}
    for before in (False, True):
        model = double_model(pe, qk_norm_before_rotary=before)  # perturbs the gains
        attn = model.transformer.h[0].attn
        x, pos = layer_inputs(model)
        shifted[before] = (lower(scores(attn, x, pos + 1000)) - lower(scores(attn, x, pos))).abs().max().item()
    assert shifted[True] < 1e-9
    assert shifted[False] > 1e-3


def test_grape_m_ctx_relative_law_in_the_phase():
    """GRAPE-M-ctx logits depend on Phi_i - Phi_j only: offsetting the running phase by a constant changes nothing."""
    model = double_model("grape_m_ctx")
    attn = model.transformer.h[0].attn
    for norm in (attn.q_rms, attn.k_rms):
        torch.nn.init.ones_(norm.weight)
    x, pos = layer_inputs(model)
    cache = LayerCache()
    cache.state["phase"] = torch.full((B, 1), 123.4, dtype=torch.float64)
    torch.testing.assert_close(lower(scores(attn, x, pos, cache)), lower(scores(attn, x, pos)), rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------------------------------------------------- KV-shift


def test_kv_shift_formula_and_state():
    """out_t = a_t y_{t-1} + (1 - a_t) y_t per head, y_{-1} = 0 (or the carried state), a = sigmoid(shift_proj x)."""
    torch.manual_seed(0)
    shift = ShiftLinear(12, 4 * 3, 4).double()
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    y = (x @ shift.linear.weight.T).view(2, 5, 4, 3)
    a = torch.sigmoid(x @ shift.shift_proj.weight.T)[..., None]
    prev = torch.cat((torch.zeros_like(y[:, :1]), y[:, :-1]), 1)
    out, last = shift(x)
    torch.testing.assert_close(out, (a * prev + (1 - a) * y).reshape(2, 5, 12))
    torch.testing.assert_close(last, y[:, -1].reshape(2, 12))
    # streaming: feeding tokens one by one with the carried state reproduces the sequence call
    state, steps = None, []
    for t in range(5):
        o, state = shift(x[:, t:t + 1], state)
        steps.append(o)
    torch.testing.assert_close(torch.cat(steps, 1), out)
