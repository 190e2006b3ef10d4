"""The PEs beyond the GRAPE reference code against their definitions, in fp64 with explicit matrices: rank-2 GRAPE-M
(Rodrigues), GRAPE-M in a learned basis, the non-commuting mixture E L_r E^T, PoPE, RoPE-ID, and the
evaluation-time RoPE scalings (PI, NTK, YaRN and their dynamic forms, against transformers' own formulas)."""

import math

import pytest
import torch
import torch.nn.functional as F

from helpers import (LAYER_BATCH, LAYER_LENGTH, double_model, full_and_cached, half_split_generator, layer_inputs,
                     lower, scores, tiny_model)
from model import (GPT, GPTConfig, orthogonal_from_skew, rodrigues_rotate, rope_inv_freq, rope_scaling,
                   rotate_half_split)

B, T = LAYER_BATCH, LAYER_LENGTH  # the shape of layer_inputs


def rank2_generator(a, b):
    return torch.outer(a, b) - torch.outer(b, a)


# ---------------------------------------------------------------------------------------------------------- Rodrigues


@pytest.mark.parametrize("s_scale", [1.0, 1e-3, 1e-9, 0.0])
def test_rodrigues_equals_matrix_exp(s_scale):
    """exp(n L(a, b)) x by the closed form == torch.linalg.matrix_exp, for generic (a, b), nearly parallel ones
    (s -> 0, the small-angle series) and exactly parallel ones (s = 0: the identity)."""
    torch.manual_seed(0)
    d = 10
    for _ in range(5):
        a = torch.randn(d, dtype=torch.float64)
        b = a * torch.randn(()).item() + s_scale * torch.randn(d, dtype=torch.float64)
        L = rank2_generator(a, b)
        x = torch.randn(7, d, dtype=torch.float64)
        for n in (0.0, 0.3, -2.0, 17.0, 1000.0):
            expected = x @ torch.linalg.matrix_exp(n * L).T
            got = rodrigues_rotate(x, a, b, torch.tensor(n, dtype=torch.float64))
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_rodrigues_group_laws():
    """Norm preservation, G(n + m) = G(n) G(m), G(-n) = G(n)^T (so G(0) = I), in fp64."""
    torch.manual_seed(1)
    d = 8
    a, b = torch.randn(d, dtype=torch.float64), torch.randn(d, dtype=torch.float64)
    G = lambda n, x: rodrigues_rotate(x, a, b, torch.tensor(float(n), dtype=torch.float64))
    eye = torch.eye(d, dtype=torch.float64)
    x = torch.randn(5, d, dtype=torch.float64)
    torch.testing.assert_close(G(3.7, x).norm(dim=-1), x.norm(dim=-1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(G(2.5, G(-1.25, x)), G(1.25, x), rtol=1e-12, atol=1e-12)
    Gn = G(4.0, eye)  # rows of G(n) applied to the basis: (G e_i)^T stacked = G^T
    torch.testing.assert_close(G(-4.0, eye), Gn.T, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(G(0.0, x), x, rtol=0, atol=0)


@pytest.mark.parametrize("s_scale", [1.0, 1e-4])
def test_rodrigues_gradients_match_finite_differences(s_scale):
    """d/d(x, a, b, n) of the closed form by autograd == central finite differences, also near s = 0."""
    torch.manual_seed(2)
    d = 6
    a = torch.randn(d, dtype=torch.float64)
    b = (0.7 * a + s_scale * torch.randn(d, dtype=torch.float64))
    x = torch.randn(3, d, dtype=torch.float64)
    n = torch.tensor([[0.9], [2.0], [-1.5]], dtype=torch.float64)
    inputs = [t.clone().requires_grad_() for t in (x, a, b, n)]
    assert torch.autograd.gradcheck(rodrigues_rotate, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_grape_m_rank2_rotates_its_plane():
    """At init head h rotates the half-split plane m = h mod D/2 by n * omega_h (RoPE's sign), the rest is fixed;
    after training-like perturbation it is exp(n omega_h L(a_h, b_h)) for its (a_h, b_h)."""
    model = double_model("grape_m_rank2", perturb=False)
    rot = model.transformer.h[0].attn.rotary
    H, D = model.config.n_head, model.config.head_dim
    x, pos = layer_inputs(model)
    q = torch.randn(B, T, H, D, dtype=torch.float64)
    got, _ = rot(q, q, x, pos)
    omega = rot.log_omega.detach().exp()
    torch.testing.assert_close(omega, 10000.0 ** (-torch.arange(H, dtype=torch.float64) / H), rtol=1e-6, atol=0)
    for h in range(H):
        freqs = torch.zeros(D // 2, dtype=torch.float64)
        freqs[h % (D // 2)] = omega[h]
        for t in (0, 5, T - 1):
            torch.testing.assert_close(got[:, t, h], q[:, t, h] @ torch.linalg.matrix_exp(t * half_split_generator(
                freqs)).T, rtol=1e-10, atol=1e-10)
    model = double_model("grape_m_rank2")
    rot = model.transformer.h[0].attn.rotary
    got, _ = rot(q, q, x, pos)
    for h in range(H):
        L = rot.log_omega[h].exp() * rank2_generator(rot.a[h], rot.b[h])
        torch.testing.assert_close(got[:, 7, h], q[:, 7, h] @ torch.linalg.matrix_exp(7 * L).T.detach(),
                                   rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------------------------------- basis


def test_grape_m_basis_with_identity_basis_is_grape_m():
    """A = 0 gives B = exp(0) = I exactly, so GRAPE-M-basis with GRAPE-M's (perturbed) spectrum is GRAPE-M."""
    grape = double_model("grape_m")
    basis = double_model("grape_m_basis", perturb=False)
    missing, unexpected = basis.load_state_dict(grape.state_dict(), strict=False)
    assert all(name.endswith("rotary.basis_skew") for name in missing) and not unexpected
    assert torch.equal(basis.transformer.h[0].attn.rotary.basis()[0], torch.eye(16, dtype=torch.float64))
    idx = torch.randint(0, 97, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(basis(idx, all_logits=True)[0], grape(idx, all_logits=True)[0], rtol=0, atol=1e-12)


def test_grape_m_basis_at_init_is_rope_exactly():
    """Canonical planes + the log-uniform spectrum (GRAPE-M-basis at init) == RoPE, to fp32 rounding of the spectrum."""
    torch.manual_seed(0)
    rope = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, head_dim=16, vocab_size=97, pos_encoding="rope"))
    basis = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, head_dim=16, vocab_size=97, pos_encoding="grape_m_basis"))
    basis.load_state_dict(rope.state_dict(), strict=False)
    idx = torch.randint(0, 97, (2, 48))
    with torch.no_grad():
        torch.testing.assert_close(basis(idx, all_logits=True)[0], rope(idx, all_logits=True)[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("share", [True, False])
def test_grape_m_basis_is_b_exp_b_transposed(share):
    """q~_t = B exp(t L_canonical) B^T q_t with B = exp(A - A^T) orthogonal (per layer or per head)."""
    model = double_model("grape_m_basis", grape_share_across_heads=share)
    rot = model.transformer.h[0].attn.rotary
    H, D = model.config.n_head, model.config.head_dim
    Bm = rot.basis().detach()
    torch.testing.assert_close(Bm @ Bm.transpose(-1, -2), torch.eye(D, dtype=torch.float64).expand_as(Bm),
                               rtol=0, atol=1e-12)
    assert torch.linalg.det(Bm).sub(1).abs().max() < 1e-10
    x, pos = layer_inputs(model)
    q = torch.randn(B, T, H, D, dtype=torch.float64)
    got, _ = rot(q, q, x, pos)
    freqs = rot.frequencies().detach().expand(H, D // 2)
    for h in range(H):
        basis = Bm[0 if share else h]
        for t in (1, T - 1):
            G = basis @ torch.linalg.matrix_exp(t * half_split_generator(freqs[h])) @ basis.T
            torch.testing.assert_close(got[:, t, h], q[:, t, h] @ G.T, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------------------------------- mixture


@pytest.mark.parametrize("rank,share", [(8, True), (16, False), (4, True)])
def test_grape_m_mix_equals_dense_exp_of_e_lr_et(rank, share):
    """q~_t = exp(t E L_r E^T) q_t, with the D x D matrix built and exponentiated explicitly; L_r non-commuting."""
    model = double_model("grape_m_mix", grape_mix_rank=rank, grape_share_across_heads=share)
    rot = model.transformer.h[0].attn.rotary
    with torch.no_grad():  # a generic skew generator: its plane rotations do not commute
        rot.generator.copy_(0.3 * torch.randn_like(rot.generator))
    H, D = model.config.n_head, model.config.head_dim
    E, L_r = (t.detach() for t in rot.subspace())
    torch.testing.assert_close(E.transpose(-1, -2) @ E, torch.eye(rank, dtype=torch.float64).expand(E.size(0), -1, -1),
                               rtol=0, atol=1e-12)
    l0, l1 = L_r[0], L_r[0].roll(1, 0).roll(1, 1)
    assert (l0 @ l1 - l1 @ l0).abs().max() > 1e-3  # genuinely non-commuting parts
    x, pos = layer_inputs(model)
    q = torch.randn(B, T, H, D, dtype=torch.float64)
    got, _ = rot(q, q, x, pos)
    for h in range(H):
        g = 0 if share else h
        L = E[g] @ L_r[g] @ E[g].T
        for t in (0, 3, T - 1):
            torch.testing.assert_close(got[:, t, h], q[:, t, h] @ torch.linalg.matrix_exp(t * L).T,
                                       rtol=1e-10, atol=1e-10)


def test_grape_m_mix_full_rank_at_init_is_rope():
    """r = D, A = 0 and L_r = RoPE's generator (its spectrum, to fp32 rounding): exp(t L) is RoPE's rotation."""
    cfg = GPTConfig(n_layer=1, n_head=4, n_embd=64, head_dim=16, pos_encoding="grape_m_mix", grape_mix_rank=16)
    gen = GPT(cfg).transformer.h[0].attn.rotary.generator[0]
    assert torch.equal(gen.diagonal(8), rope_inv_freq(16, 10000.0))
    assert torch.count_nonzero(gen) == 8
    model = double_model("grape_m_mix", perturb=False, grape_mix_rank=16)
    rot = model.transformer.h[0].attn.rotary
    x, pos = layer_inputs(model)
    q = torch.randn(B, T, 4, 16, dtype=torch.float64)
    phi = (pos + 300).double()[:, None] * rot.generator[0].detach().diagonal(8)
    expected = rotate_half_split(q, phi.cos()[None, :, None], phi.sin()[None, :, None])
    torch.testing.assert_close(rot(q, q, x, pos + 300)[0], expected, rtol=1e-10, atol=1e-10)
    # an fp32 model far into the sequence: exp(n L_r) is taken in fp64, so the rotation is right to fp32 rounding
    # (fp32 scaling and squaring was off by 2e-3 at n = 16000)
    rot32 = GPT(cfg).transformer.h[0].attn.rotary
    far = torch.arange(16000, 16000 + T)
    phi = far.double()[:, None] * rot32.generator[0].detach().double().diagonal(8)
    exact = rotate_half_split(q, phi.cos()[None, :, None], phi.sin()[None, :, None])
    assert (rot32(q.float(), q.float(), x.float(), far)[0].double() - exact).abs().max() < 1e-5


def test_grape_m_mix_relative_law_with_small_rank():
    model = double_model("grape_m_mix", grape_mix_rank=6)
    attn = model.transformer.h[0].attn
    for norm in (attn.q_rms, attn.k_rms):
        torch.nn.init.ones_(norm.weight)
    x, pos = layer_inputs(model)
    torch.testing.assert_close(lower(scores(attn, x, pos + 500)), lower(scores(attn, x, pos)), rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------------------------------------------------- PoPE


def test_pope_logits_are_the_cosine_form():
    """logit(t, s) = sum_c softplus(q_tc) softplus(k_sc) cos((s - t) theta_c + clamp(delta_hc, -2pi, 0)) / sqrt(D),
    theta_c = base^(-c/D), q and k QK-normed first; values keep width D."""
    model = double_model("pope")
    attn = model.transformer.h[0].attn
    rot = attn.rotary
    with torch.no_grad():  # some offsets outside [-2 pi, 0], to exercise the clamp
        rot.phase_bias.copy_(torch.linspace(-9.0, 2.0, rot.phase_bias.numel()).view_as(rot.phase_bias))
    H, D = model.config.n_head, model.config.head_dim
    x, pos = layer_inputs(model)
    got = scores(attn, x, pos)
    q = attn.q_rms(attn.c_q(x).view(B, T, H, D))
    k = attn.k_rms(attn.c_k(x).view(B, T, H, D))
    mq, mk = F.softplus(q), F.softplus(k)
    theta = 10000.0 ** (-torch.arange(D, dtype=torch.float64) / D)
    delta = rot.phase_bias.clamp(-2 * math.pi, 0)
    expected = torch.full((B, H, T, T), float("-inf"), dtype=torch.float64)
    for t in range(T):
        for s in range(t + 1):
            angle = (s - t) * theta + delta  # (H, D)
            expected[:, :, t, s] = (mq[:, t] * mk[:, s] * angle.cos()).sum(-1) / math.sqrt(D)
    torch.testing.assert_close(lower(got), lower(expected), rtol=1e-10, atol=1e-10)
    _, k_out, v_out, _ = attn.qkv(x, pos)
    assert k_out.size(-1) == 2 * D and v_out.size(-1) == D


def test_pope_phase_bias_only_moves_inside_its_range():
    model = tiny_model("pope").train()
    rot = model.transformer.h[0].attn.rotary
    with torch.no_grad():
        rot.phase_bias.copy_(torch.linspace(-8.0, 1.0, rot.phase_bias.numel()).view_as(rot.phase_bias))
    idx = torch.randint(0, 97, (2, 16))
    model(idx, torch.roll(idx, -1, 1))[1].backward()
    inside = (rot.phase_bias > -2 * math.pi) & (rot.phase_bias < 0)
    assert torch.all(rot.phase_bias.grad[~inside] == 0) and rot.phase_bias.grad[inside].abs().min() > 0


# ---------------------------------------------------------------------------------------------------------- RoPE-ID


def test_rope_id_frequencies_and_layout():
    """D/4 pairs log-spaced from 2 pi / 32 to 4 pi / L (L = block_size), the other D/4 pairs (quarters 2 and 4 of the
    half-split layout) not rotated; so quarters 2 and 4 of q pass through unchanged."""
    cfg = GPTConfig(n_layer=1, n_head=2, n_embd=64, head_dim=32, vocab_size=97, block_size=4096, pos_encoding="rope_id")
    rot = GPT(cfg).transformer.h[0].attn.rotary
    f = rot.frequencies(torch.float64, None)
    assert f.shape == (16,)
    torch.testing.assert_close(f[0], torch.tensor(2 * math.pi / 32, dtype=torch.float64), rtol=1e-12, atol=0)
    torch.testing.assert_close(f[7], torch.tensor(4 * math.pi / 4096, dtype=torch.float64), rtol=1e-12, atol=0)
    ratios = f[1:8] / f[:7]
    torch.testing.assert_close(ratios, ratios[:1].expand(7), rtol=1e-12, atol=0)  # log-uniform
    assert torch.all(f[8:] == 0)
    q = torch.randn(1, 5, 2, 32)
    rq, _ = rot(q, q, torch.zeros(1, 5, 64), torch.arange(100, 105))
    for quarter in (slice(8, 16), slice(24, 32)):
        assert torch.equal(rq[..., quarter], q[..., quarter])
    assert not torch.allclose(rq[..., :8], q[..., :8])


def test_rope_id_temperature():
    """Query t's logits x (1 + 0.1 ln(max(t, L) / L))^2: 1 inside the training length, YaRN's factor beyond."""
    model = double_model("rope_id", block_size=8)
    attn = model.transformer.h[0].attn
    x, pos = layer_inputs(model)  # T = 12 > L = 8
    hot = scores(attn, x, pos)
    attn.rotary.cfg.rope_id_temperature = False
    cold = scores(attn, x, pos)
    attn.rotary.cfg.rope_id_temperature = True
    factor = (1 + 0.1 * torch.log(torch.clamp(pos.double(), min=8) / 8)) ** 2
    assert torch.all(factor[:9] == 1) and factor[11] > 1
    torch.testing.assert_close(lower(hot), lower(cold * factor[:, None]), rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------------------- RoPE scaling


def scaling_config(kind, factor=8.0, **kw):
    return GPTConfig(n_layer=1, n_head=1, n_embd=128, head_dim=128, block_size=4096, pos_encoding="rope",
                     rope_scaling=kind, rope_scaling_factor=factor, **kw)


def test_yarn_worked_example():
    """d = 128, b = 1e4, L = 4096 (pe_variants §4.3): low = 20, high = 46, pairs 0-20 keep their frequency, 46-63 are
    divided by s, linear in the pair index between; logits x (0.1 ln s + 1)^2."""
    theta = rope_inv_freq(128, 10000.0, dtype=torch.float64)
    got, logit_scale = rope_scaling(theta, scaling_config("yarn", 16.0), torch.arange(10))
    torch.testing.assert_close(got[:21], theta[:21], rtol=0, atol=0)
    torch.testing.assert_close(got[46:], theta[46:] / 16, rtol=1e-15, atol=0)
    ramp = (torch.arange(21, 46, dtype=torch.float64) - 20) / 26
    torch.testing.assert_close(got[21:46], theta[21:46] / 16 * ramp + theta[21:46] * (1 - ramp), rtol=1e-14, atol=0)
    assert math.isclose(logit_scale, (0.1 * math.log(16) + 1) ** 2, rel_tol=1e-15)
    assert math.isclose(math.sqrt(logit_scale), 1.2772588722239781, rel_tol=1e-12)


@pytest.mark.parametrize("kind,hf_type", [("yarn", "yarn"), ("pi", "linear")])
def test_static_scalings_equal_transformers(kind, hf_type):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    hf = LlamaConfig(hidden_size=128, num_attention_heads=1, head_dim=128, max_position_embeddings=32768,
                     rope_parameters=dict(rope_type=hf_type, rope_theta=10000.0, factor=8.0,
                                          original_max_position_embeddings=4096))
    hf_freq, hf_scale = ROPE_INIT_FUNCTIONS[hf_type](hf, "cpu")
    got, scale = rope_scaling(rope_inv_freq(128, 10000.0), scaling_config(kind), torch.arange(8))
    torch.testing.assert_close(got, hf_freq, rtol=1e-6, atol=0)
    assert math.isclose(scale, hf_scale ** 2, rel_tol=1e-12)  # HF scales cos and sin (q and k); we scale q


def test_ntk_is_a_new_base_and_dynamic_ntk_equals_transformers():
    theta = rope_inv_freq(128, 10000.0, dtype=torch.float64)
    got, _ = rope_scaling(theta, scaling_config("ntk", 4.0), torch.arange(8))
    torch.testing.assert_close(got, rope_inv_freq(128, 10000.0 * 4.0 ** (128 / 126), dtype=torch.float64),
                               rtol=1e-12, atol=0)
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    hf = LlamaConfig(hidden_size=128, num_attention_heads=1, head_dim=128, max_position_embeddings=4096,
                     rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0))
    for length in (1000, 4096, 10000):
        hf_freq, _ = ROPE_INIT_FUNCTIONS["dynamic"](hf, "cpu", seq_len=length)
        got, _ = rope_scaling(rope_inv_freq(128, 10000.0), scaling_config("dynamic_ntk", 2.0), torch.arange(length))
        torch.testing.assert_close(got, hf_freq, rtol=1e-5, atol=0)


def test_dynamic_yarn_follows_the_length():
    theta = rope_inv_freq(128, 10000.0, dtype=torch.float64)
    cfg = scaling_config("dynamic_yarn")
    assert torch.equal(rope_scaling(theta, cfg, torch.arange(4096))[0], theta)  # inside L: unchanged
    got, scale = rope_scaling(theta, cfg, torch.arange(3 * 4096))
    want, want_scale = rope_scaling(theta, scaling_config("yarn", 3.0), torch.arange(8))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert scale == want_scale > 1


@pytest.mark.parametrize("kind", ["pi", "ntk", "yarn"])
@pytest.mark.parametrize("pe", ["rope", "grape_m", "grape_m_basis"])
def test_scaled_models_decode_like_their_full_forward(kind, pe):
    """Static scalings are functions of position only: cached decoding == full forward; and they change logits."""
    model = tiny_model(pe, kv_shift=True, rope_scaling=kind, rope_scaling_factor=4.0, train_length=8)
    idx = torch.randint(0, 97, (2, 20))
    full, cached = full_and_cached(model, idx, [5])
    with torch.no_grad():
        assert (tiny_model(pe, kv_shift=True)(idx, all_logits=True)[0] - full).abs().max() > 1e-3
    torch.testing.assert_close(cached, full, rtol=0, atol=1e-5)


def test_rope_scaling_is_refused_where_it_does_not_apply():
    for pe in ("alibi", "pope", "rope_id", "grape_m_ctx"):
        with pytest.raises(ValueError, match="rope_scaling"):
            GPTConfig(pos_encoding=pe, rope_scaling="yarn", rope_scaling_factor=2.0)
    with pytest.raises(ValueError, match="rope_scaling must be one of"):
        GPTConfig(pos_encoding="rope", rope_scaling="longrope")
    with pytest.raises(ValueError, match="grape_mix_rank"):
        GPTConfig(pos_encoding="grape_m_mix", head_dim=16, grape_mix_rank=5)
    with pytest.raises(ValueError, match="rope_id"):
        GPTConfig(pos_encoding="rope_id", head_dim=6)


def test_orthogonal_from_skew():
    a = torch.randn(3, 9, 9, dtype=torch.float64)
    Bm = orthogonal_from_skew(a)
    torch.testing.assert_close(Bm.transpose(-1, -2) @ Bm, torch.eye(9, dtype=torch.float64).expand(3, -1, -1),
                               rtol=0, atol=1e-12)
    assert torch.equal(orthogonal_from_skew(torch.zeros(4, 4)), torch.eye(4))


def test_evaluation_block_size_override_keeps_the_training_length(tmp_path):
    """Loading for evaluation with a larger block_size (longer contexts) must not change RoPE-ID's frequencies or
    temperature, nor the length rope_scaling refers to: eval pins train_length to the checkpoint's block_size."""
    from checkpoint import save_model_only
    from eval.load import load

    model = tiny_model("rope_id", block_size=16)
    ckpt = save_model_only(model, tmp_path / "run", step=1)
    loaded = load(ckpt, overrides=["block_size=64"], device="cpu").model
    assert loaded.config.block_size == 64 and loaded.config.train_length == 16
    idx = torch.randint(0, 97, (1, 40))
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx, all_logits=True)[0], model(idx, all_logits=True)[0], rtol=0, atol=1e-6)
    yarn = load(ckpt.parent, overrides=["pos_encoding=rope", "rope_scaling=yarn", "rope_scaling_factor=4"],
                device="cpu").model
    assert yarn.config.train_length == 16
