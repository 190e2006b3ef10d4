"""The model as a whole, for every PE: sizes, init, causality, KV-cache decoding, gradients, bf16 autocast."""

import math

import pytest
import torch

from helpers import full_and_cached, perturb_pe_parameters, tiny_config, tiny_model
from model import (ADDITIVE_PES, GPT, PE_CLASSES, ROTARY_PES, GPTConfig, GrapeA, build_pe,
                   split_pos_encoding)

ALL_PES = ["nope", *ROTARY_PES, *ADDITIVE_PES]
COMPOSED_PES = ["rope+alibi", "grape_m+grape_ap", "grape_m_ctx+fox", "grape_m+grape_a_qk", "pope+grape_ap",
                "rope_id+fox", "grape_m_mix+alibi", "grape_m_basis+grape_a_k", "grape_m_rank2+grape_ap"]


# ---------------------------------------------------------------------------------------------------------- sizes


@pytest.mark.parametrize("preset,expected", [("medium", 353_508_352), ("large", 772_234_496)])
def test_paper_parameter_counts(preset, expected):
    with torch.device("meta"):
        model = GPT(GPTConfig.from_preset(preset, pos_encoding="rope"))
    assert model.num_params() == expected
    cfg = model.config
    L, C, D, V = cfg.n_layer, cfg.n_embd, cfg.head_dim, cfg.vocab_size
    assert expected == L * (4 * C * C + 3 * C * (8 * C // 3) + 2 * C + 2 * D) + V * C + C


@pytest.mark.parametrize("pe,extra_medium,extra_large", [
    ("alibi", 0, 0), ("nope", 0, 0),
    ("fox", 196_800, 461_160), ("grape_a_k", 24_768, None), ("grape_a_q", 24_768, None),
    ("grape_a_qk", 49_344, None), ("grape_ap", 1_572_864, 3_686_400),
    ("grape_m", 1_536, 2_304), ("grape_m_ctx", 26_136, 48_420),
])
def test_extra_parameters_per_variant(pe, extra_medium, extra_large):
    """Extra parameters over RoPE, as tabulated for the reference code (GRAPE §2.11)."""
    for preset, extra, rope_count in (("medium", extra_medium, 353_508_352), ("large", extra_large, 772_234_496)):
        if extra is None:
            continue
        with torch.device("meta"):
            model = GPT(GPTConfig.from_preset(preset, pos_encoding=pe))
        assert model.num_params() - rope_count == extra


@pytest.mark.parametrize("preset,rope_count,extra", [("medium", 353_508_352, 393_216), ("large", 772_234_496, 921_600)])
def test_kv_shift_parameters(preset, rope_count, extra):
    """KV-shift adds a shift_proj (C -> H) to c_k and to c_v: 2 C H per layer."""
    with torch.device("meta"):
        model = GPT(GPTConfig.from_preset(preset, pos_encoding="rope", kv_shift=True))
    assert model.num_params() == rope_count + extra


def test_weight_tying_and_no_biases():
    model = GPT(tiny_config("rope"))
    assert model.lm_head.weight is model.transformer.wte.weight
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            assert module.bias is None, name


# ---------------------------------------------------------------------------------------------------------- init


INIT_PES = ["nope", *ROTARY_PES, *ADDITIVE_PES, "grape_m+grape_ap"]
MATRICES = ("c_q.weight", "c_k.weight", "c_v.weight", "c_k.linear.weight", "c_v.linear.weight", "shift_proj.weight",
            "c_fc1.weight", "c_fc2.weight", "additive.fgate.weight", "additive.c_p.weight")


def documented_init(name, cfg):
    """What GRAPE §1.6 and the PE docstrings say parameter `name` starts as, worked out here from the config: a
    float std for N(0, std^2), or a function of the parameter's shape giving its exact fp64 value."""
    C, L, H, D, base = cfg.n_embd, cfg.n_layer, cfg.n_head, cfg.head_dim, cfg.rope_base
    sigma_h = 0.5 / math.sqrt(C)
    pairs = torch.arange(D // 2, dtype=torch.float64)
    constant = lambda value: lambda shape: torch.full(shape, value, dtype=torch.float64)
    if name == "transformer.wte.weight":
        return 0.02
    if name.endswith(("attn.c_proj.weight", "mlp.c_proj.weight")):
        return sigma_h / math.sqrt(L)
    if name.endswith(MATRICES):
        return sigma_h
    if name.endswith(("additive.u", "additive.v")):
        return 1 / math.sqrt(D)
    if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight", "q_rms.weight", "k_rms.weight")):
        return constant(1.0)
    if name.endswith(("omega_proj.weight", "basis_skew", "phase_bias", "fgate.bias")):
        return constant(0.0)
    if name.endswith("omega_proj.bias"):
        return constant(math.log(math.expm1(1e-3)))  # softplus^-1(grape_ctx_init_omega)
    if name.endswith("additive.omega"):
        return constant(math.log(math.e - 1))  # softplus(omega) = 1
    if name.endswith("rotary.log_freq"):  # lambda = S log(RoPE spectrum); S = 16 for GRAPE-M, 1 for GRAPE-M-ctx
        scale = 1.0 if cfg.pos_encoding == "grape_m_ctx" else 16.0
        return lambda shape: (scale * -2 * pairs / D * math.log(base)).expand(shape)
    if name.endswith(("rotary.a", "rotary.b")):  # head h rotates the half-split plane m = h mod D/2
        column = torch.arange(H) % (D // 2) + (D // 2 if name.endswith(".b") else 0)
        return lambda shape: torch.eye(D, dtype=torch.float64)[column]
    if name.endswith("rotary.log_omega"):
        return lambda shape: -math.log(base) * torch.arange(H, dtype=torch.float64) / H
    if name.endswith("rotary.generator"):  # RoPE's generator for head dim r: pair i turns at base^(-2i/r)
        r = cfg.grape_mix_rank
        def generator(shape):
            g = torch.zeros(shape, dtype=torch.float64)
            g[:, torch.arange(r // 2), r // 2 + torch.arange(r // 2)] = base ** (-2 * torch.arange(r // 2) / r).double()
            return g
        return generator
    raise AssertionError(f"parameter {name} has no documented init in this test")


@pytest.mark.parametrize("pe", INIT_PES)
def test_init_statistics_for_every_encoding(pe):
    """GRAPE §1.6: embedding N(0, 0.02^2); residual outputs N(0, sigma_o^2); other matrices N(0, sigma_h^2);
    norm gains 1; PE parameters with the inits their classes document. Every parameter of every encoding (with
    KV-shift) is checked against a value worked out here, not read from the model's init plan."""
    cfg = GPTConfig(n_layer=4, n_head=4, n_embd=256, head_dim=64, vocab_size=4096, pos_encoding=pe, kv_shift=True)
    model = GPT(cfg)
    for name, p in model.named_parameters():
        expected = documented_init(name, cfg)
        if callable(expected):
            torch.testing.assert_close(p.double(), expected(p.shape), rtol=1e-6, atol=1e-6, msg=name)
            continue
        n = p.numel()
        assert abs(p.mean().item()) < 4 * expected / math.sqrt(n), name
        assert abs(p.std().item() / expected - 1) < 6 / math.sqrt(2 * n), (name, p.std().item(), expected)


def test_init_plan_names_every_parameter_once():
    """The init contract: every parameter is "own" (its module's reset_parameters) or "global" (drawn by
    init_weights); the PE matrices that take the model's init are exactly FoX's gate and GRAPE-AP's probe."""
    for pe in INIT_PES:
        model = GPT(tiny_config(pe, kv_shift=True))
        plan = model.init_plan()
        assert list(plan) == [name for name, _ in model.named_parameters()]
        assert set(plan.values()) <= {"own", "global"}
        pe_global = {n.split(".", 3)[-1] for n, kind in plan.items() if kind == "global" and ("rotary" in n
                                                                                             or "additive" in n)}
        assert pe_global == {"fox": {"attn.additive.fgate.weight"}, "grape_ap": {"attn.additive.c_p.weight"},
                             "grape_m+grape_ap": {"attn.additive.c_p.weight"}}.get(pe, set()), pe


@pytest.mark.parametrize("where,attach", [
    ("transformer.h.1.attn.rotary.extra", lambda attn: setattr(attn.rotary, "extra", torch.nn.Parameter(
        torch.empty(4, 4)))),
    ("transformer.h.1.attn.additive.probe.weight", lambda attn: setattr(attn.additive, "probe", torch.nn.Linear(
        4, 4, bias=False))),
    ("transformer.h.1.attn.gain", lambda attn: setattr(attn, "gain", torch.nn.Parameter(torch.ones(4)))),
])
def test_init_refuses_an_undeclared_parameter(where, attach):
    """A parameter that no module declares (a PE's new matrix, a layer inside a PE, a parameter outside any PE) is
    an error naming it, raised before any weight changes, instead of a silent redraw from N(0, sigma_h^2)."""
    model = GPT(tiny_config("grape_m+fox"))
    attach(model.transformer.h[1].attn)
    before = {name: p.clone() for name, p in model.named_parameters()}
    with pytest.raises(ValueError, match=f"parameter '{where}' has no declared init"):
        model.init_weights()
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())


def test_init_refuses_a_parameter_declared_twice(monkeypatch):
    monkeypatch.setattr(type(GPT(tiny_config("fox")).transformer.h[0].attn.additive), "own_init",
                        ("fgate.bias", "fgate.weight"))
    with pytest.raises(ValueError, match=r"FoX declares \['fgate.weight'\] in both own_init and global_init"):
        GPT(tiny_config("fox"))


def test_init_weights_is_idempotent_in_distribution_and_resets_pe():
    model = GPT(tiny_config("grape_m_ctx"))
    perturb_pe_parameters(model)
    model.init_weights()
    rot = model.transformer.h[0].attn.rotary
    assert torch.all(rot.omega_proj.weight == 0)
    assert torch.all(model.transformer.h[0].attn.q_rms.weight == 1)


# ---------------------------------------------------------------------------------------------------------- causality


@pytest.mark.parametrize("kv_shift", [False, True])
@pytest.mark.parametrize("pe", ALL_PES + COMPOSED_PES)
def test_causality(pe, kv_shift):
    model = tiny_model(pe, kv_shift)
    idx = torch.randint(0, 97, (2, 20))
    changed = idx.clone()
    changed[:, 12:] = torch.randint(0, 97, (2, 8))
    with torch.no_grad():
        a, _ = model(idx, all_logits=True)
        b, _ = model(changed, all_logits=True)
    assert torch.equal(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


# ---------------------------------------------------------------------------------------------------------- KV cache


@pytest.mark.parametrize("kv_shift", [False, True])
@pytest.mark.parametrize("pe", ALL_PES + COMPOSED_PES)
def test_cached_decoding_equals_full_forward(pe, kv_shift):
    torch.set_default_dtype(torch.float32)
    full, cached = full_and_cached(tiny_model(pe, kv_shift), torch.randint(0, 97, (3, 40)), [9, 16])
    assert full.abs().max() > 1.0  # logits are not trivially small
    assert (cached - full).abs().max().item() <= 1e-5


@pytest.mark.parametrize("pe,kw", [("grape_m_ctx", dict(grape_ctx_per_head=True)),
                                   ("grape_m", dict(grape_share_across_heads=False)),
                                   ("grape_m_basis", dict(grape_share_across_heads=False)),
                                   ("grape_m_mix", dict(grape_mix_rank=6, grape_share_across_heads=False)),
                                   ("grape_ap", dict(grape_ap_tie="q")), ("grape_ap", dict(grape_ap_tie="v")),
                                   ("grape_ap", dict(grape_ap_query_norm=True)),
                                   ("rope", dict(qk_norm_before_rotary=True)), ("rope_id", dict(block_size=8))])
def test_cached_decoding_equals_full_forward_for_pe_options(pe, kw):
    full, cached = full_and_cached(tiny_model(pe, kv_shift=True, **kw), torch.randint(0, 97, (2, 24)), [7])
    assert (cached - full).abs().max().item() <= 1e-5


@pytest.mark.parametrize("pe", ["rope", "alibi", "fox", "grape_m_ctx", "grape_ap", "grape_m+grape_a_k"])
def test_generate_with_and_without_cache(pe):
    model = tiny_model(pe, kv_shift=True)
    prompt = torch.randint(0, 97, (2, 5))
    a = model.generate(prompt, 12, use_cache=True)
    b = model.generate(prompt, 12, use_cache=False)
    assert a.shape == (2, 17)
    assert torch.equal(a[:, :5], prompt)
    assert torch.equal(a, b)
    torch.manual_seed(1)
    c = model.generate(prompt, 6, temperature=1.0, top_k=5)
    assert c.shape == (2, 11)


def test_no_quadratic_state_is_kept():
    """No T x T tensor survives a forward: buffers stay the same size whatever T is, and no module attribute holds
    a tensor beyond its parameters and buffers."""
    for pe in ADDITIVE_PES:
        model = tiny_model(pe)
        sizes = []
        for T in (8, 64):
            with torch.no_grad():
                model(torch.randint(0, 97, (1, T)))
            sizes.append(sum(b.numel() for b in model.buffers()))
            for module in model.modules():
                for value in vars(module).values():
                    assert not (isinstance(value, torch.Tensor) and value.numel() >= T * T), (pe, type(module))
        assert sizes[0] == sizes[1], pe


# ---------------------------------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("kv_shift", [False, True])
@pytest.mark.parametrize("pe", ALL_PES + COMPOSED_PES)
def test_gradients_reach_every_parameter(pe, kv_shift):
    model = tiny_model(pe, kv_shift).train()
    idx = torch.randint(0, 97, (2, 24))
    _, loss = model(idx, targets=torch.roll(idx, -1, 1))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max() > 0, name


# ---------------------------------------------------------------------------------------------------------- outputs


def test_forward_outputs():
    model = tiny_model("rope")
    idx = torch.randint(0, 97, (2, 10))
    logits, loss = model(idx)
    assert logits.shape == (2, 1, 97) and logits.dtype == torch.float32 and loss is None
    full, _ = model(idx, all_logits=True)
    torch.testing.assert_close(full[:, -1:], logits)
    targets = torch.roll(idx, -1, 1)
    targets[:, -1] = -1  # ignored
    logits, loss = model(idx, targets)
    assert logits.shape == (2, 10, 97)
    expected = torch.nn.functional.cross_entropy(full[:, :-1].reshape(-1, 97), targets[:, :-1].reshape(-1))
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("pe", ALL_PES + ["grape_m+grape_ap"])
def test_bf16_autocast_on_cpu(pe):
    """The training precision path (bf16 autocast, fp32 norms/PE math, fp32 logits) runs and stays close to fp32."""
    model = tiny_model(pe, kv_shift=True, embedding_init_std=0.02).train()
    idx = torch.randint(0, 97, (2, 32))
    targets = torch.roll(idx, -1, 1)
    _, loss32 = model(idx, targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss16 = model(idx, targets)
    assert logits.dtype == torch.float32
    loss16.backward()
    assert abs(loss16.item() - loss32.item()) < 0.02
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("pe", ["rope", "alibi", "grape_ap"])
def test_bf16_autocast_cached_decoding(pe):
    model = tiny_model(pe, kv_shift=True)
    idx = torch.randint(0, 97, (2, 16))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        full, _ = model(idx, all_logits=True)
        cache = model.new_cache()
        pieces = [model(idx[:, :6], cache=cache, all_logits=True)[0]]
        pieces += [model(idx[:, t:t + 1], cache=cache, all_logits=True)[0] for t in range(6, 16)]
    # bf16 carries ~3 significant digits; the two paths differ only in rounding
    assert (torch.cat(pieces, 1) - full).abs().max() < 0.1 * full.abs().max()


# ---------------------------------------------------------------------------------------------------------- config


def test_pe_registry_is_the_one_list():
    """ROTARY_PES and ADDITIVE_PES are the registry's names by role, in its order, and each name builds its class."""
    assert ROTARY_PES + ADDITIVE_PES == tuple(PE_CLASSES)
    for name, cls in PE_CLASSES.items():
        rotary, additive = build_pe(tiny_config(name))
        built, other = (rotary, additive) if name in ROTARY_PES else (additive, rotary)
        assert type(built) is cls and other is None, name
    with pytest.raises(TypeError, match="gated subclass"):
        GrapeA(tiny_config("grape_a_q"))


def test_pos_encoding_names():
    assert split_pos_encoding("nope") == (None, None)
    assert split_pos_encoding("grape_m") == ("grape_m", None)
    assert split_pos_encoding("grape_ap") == (None, "grape_ap")
    assert split_pos_encoding("grape_m+grape_ap") == ("grape_m", "grape_ap")
    for bad in ("rotary", "alibi+rope", "rope+grape_m", "rope+alibi+fox", ""):
        with pytest.raises(ValueError, match="pos_encoding"):
            GPTConfig(pos_encoding=bad)


def test_interface_argument_order():
    """GPTConfig(n_layer, n_head, n_embd, head_dim, vocab_size, block_size, ...) and
    generate(idx, max_new_tokens, temperature, use_cache) work positionally, as documented."""
    cfg = GPTConfig(2, 4, 64, 16, 97, 32, pos_encoding="alibi")
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.head_dim, cfg.vocab_size, cfg.block_size) == (2, 4, 64, 16, 97, 32)
    model = GPT(cfg).eval()
    prompt = torch.randint(0, 97, (1, 4))
    assert torch.equal(model.generate(prompt, 5, 0.0, False), model.generate(prompt, 5))


def test_weight_decay_groups():
    """The reference's AdamW groups: every RMSNorm gain (ln_1, ln_2, ln_f, q_rms, k_rms) without decay, every other
    parameter (embedding, linears, PE parameters and gates, KV-shift) with it; each parameter exactly once."""
    model = GPT(tiny_config("grape_a_qk", kv_shift=True))
    decay, no_decay = model.optimizer_param_groups(0.01)
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert not decay_names & no_decay_names and decay_names | no_decay_names == set(names.values())
    assert no_decay_names == {n for n in names.values() if n.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight",
                                                                      "q_rms.weight", "k_rms.weight"))}
    assert {"transformer.wte.weight", "transformer.h.0.attn.additive.omega", "transformer.h.0.attn.additive.u",
            "transformer.h.0.attn.c_k.shift_proj.weight"} <= decay_names


@pytest.mark.parametrize("pe", ["rope", "alibi"])
def test_kv_shift_acts_on_raw_projections_before_rotary_and_norm(pe):
    """Reference order (§3): k = k_rms(rotate(shift(c_k x))) for rotary PEs, k_rms(shift(c_k x)) otherwise; v is
    shifted and neither rotated nor normalised; q is never shifted."""
    model = tiny_model(pe, kv_shift=True)
    attn = model.transformer.h[0].attn
    x = torch.randn(2, 9, 64)
    pos = torch.arange(9)
    q, k, v, _ = attn.qkv(x, pos)
    heads = (2, 9, 4, 16)
    k_ref, v_ref = attn.c_k(x)[0].view(heads), attn.c_v(x)[0].view(heads)
    q_ref = attn.c_q(x).view(heads)
    if attn.rotary is not None:
        q_ref, k_ref = attn.rotary(q_ref, k_ref, x, pos)
    torch.testing.assert_close(k, attn.k_rms(k_ref), rtol=0, atol=0)
    torch.testing.assert_close(q, attn.q_rms(q_ref), rtol=0, atol=0)
    torch.testing.assert_close(v, v_ref, rtol=0, atol=0)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="head_dim"):
        GPTConfig(pos_encoding="rope", head_dim=15)
    with pytest.raises(ValueError, match="grape_ap_tie"):
        GPTConfig(pos_encoding="grape_ap", grape_ap_tie="p")
    with pytest.raises(ValueError, match="grape_ap_p_head_dim"):
        GPTConfig(pos_encoding="grape_ap", grape_ap_p_head_dim=7)
    with pytest.raises(ValueError, match="n_layer"):
        GPTConfig(n_layer=0)
    with pytest.raises(ValueError, match="preset"):
        GPTConfig.from_preset("huge")
