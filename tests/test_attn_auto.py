"""attn_impl="auto": the choice of path (model.attention_path) under every condition, faked on the CPU; each fused
path's wiring in CausalSelfAttention.attend against the chunked path, with the kernel replaced by an independent
reference of its documented contract (fla's parallel_forgetting_attn, kernels/grape_ap.py); the fallback when a
kernel's package is missing, logged once; FlexAttention's padding to 128-token blocks, values and gradients; fla's
real kernel under the Triton interpreter where fla-core and Triton are installed; and the config field's default.

The real fused kernels run on CUDA only (FlexAttention has no CPU backward, fla's Triton kernels no CPU driver);
scripts/gpu_check.py compares them with the chunked path on a GPU."""

import logging
import math
import os
import sys
import types

import pytest
import torch
import torch.nn.functional as F

import fused_attention
import model
from chunked_attention import FLEX_BLOCK, _causal_block_mask, chunked_bias_attention, flex_pairwise_attention
from config import build_config
from helpers import tiny_config, tiny_model
from model import ADDITIVE_PES, GPT, PE_CLASSES, attention_path
from test_attention_chunked import layer_run  # output, grad of x and of every parameter

ATOL = 1e-5  # fp32, outputs and gradients, relative to max(1, |largest entry|) (FoX: 1e-4, see the tests)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _fresh_kernel_state():
    """Each test sees the kernels' import attempted afresh and no fallback logged yet."""
    loaded, logged = dict(fused_attention._LOADED), set(model._logged)
    fused_attention._LOADED.clear()
    model._logged.clear()
    yield
    fused_attention._LOADED.clear()
    fused_attention._LOADED.update(loaded)
    model._logged.clear()
    model._logged.update(logged)


def choose(impl="auto", fused=("flex",), device="cuda", dtype=torch.bfloat16, head_dim=128, Tq=4096, Tk=4096,
           missing=()):
    """attention_path with made-up facts; `missing`: the kernels whose package is absent."""
    return attention_path(impl, fused, device, dtype, head_dim, Tq, Tk,
                          unavailable=lambda kernel: f"{kernel} not installed" if kernel in missing else None)


# ------------------------------------------------------------------------------------------------ the choice of path


def test_every_additive_pe_declares_its_fused_kernels():
    declared = {name: PE_CLASSES[name].fused for name in ADDITIVE_PES}
    assert declared == {"alibi": ("flex",), "fox": ("fla", "flex"), "grape_a_q": ("flex",), "grape_a_k": ("flex",),
                        "grape_a_qk": ("flex",), "grape_ap": ("grape_ap",)}
    # a composition's attention is its additive part's
    assert type(GPT(tiny_config("grape_m+fox")).transformer.h[0].attn.additive).fused == ("fla", "flex")


def test_auto_on_cuda_takes_each_pes_first_kernel():
    assert choose(fused=("flex",)) == ("flex", None)
    assert choose(fused=("fla", "flex")) == ("fla", None)
    assert choose(fused=("grape_ap",)) == ("grape_ap", None)
    for dtype in (torch.float16, torch.float32):
        assert choose(fused=("flex",), dtype=dtype) == ("flex", None)


def test_a_missing_package_moves_to_the_next_kernel_then_to_chunked():
    assert choose(fused=("fla", "flex"), missing=("fla",)) == ("flex", None)
    path, why = choose(fused=("grape_ap",), missing=("grape_ap",))
    assert path == "chunked" and why == "grape_ap: grape_ap not installed"


@pytest.mark.parametrize("facts,words", [
    (dict(device="cpu"), "device cpu"),
    (dict(device="mps"), "device mps"),
    (dict(Tq=1, Tk=300), "cached decoding (1 queries, 300 keys)"),
    (dict(Tq=7, Tk=300), "cached decoding"),
    (dict(dtype=torch.float64), "dtype torch.float64"),
])
@pytest.mark.parametrize("fused", [("flex",), ("fla", "flex"), ("grape_ap",)])
def test_no_fused_kernel_off_cuda_in_decoding_or_in_fp64(facts, words, fused):
    path, why = choose(fused=fused, **facts)
    assert path == "chunked" and words in why


def test_head_dim_limits():
    path, why = choose(fused=("flex",), head_dim=48)
    assert path == "chunked" and "head dim 48" in why and "power of two" in why
    assert choose(fused=("flex",), head_dim=8)[0] == "chunked"
    assert choose(fused=("flex",), head_dim=16) == ("flex", None)
    assert choose(fused=("flex",), head_dim=256) == ("flex", None)
    assert choose(fused=("fla", "flex"), head_dim=96) == ("fla", None)  # fla takes any head dim up to 256
    assert choose(fused=("fla", "flex"), head_dim=96, missing=("fla",))[0] == "chunked"
    path, why = choose(fused=("fla", "flex"), head_dim=512)
    assert path == "chunked" and "fla: head dim 512" in why and "flex: head dim 512" in why
    assert choose(fused=("grape_ap",), head_dim=96) == ("grape_ap", None)  # padded to 128 inside the kernel
    path, why = choose(fused=("grape_ap",), head_dim=512)
    assert path == "chunked" and "kernels/grape_ap.py: at most 256" in why


def test_explicit_impls():
    for impl in ("chunked", "dense"):
        for fused in ((), ("flex",), ("fla", "flex"), ("grape_ap",)):
            assert choose(impl, fused) == (impl, None)
            assert choose(impl, fused, device="cpu") == (impl, None)
    assert choose("flex", ("fla", "flex")) == ("flex", None)  # "flex" means FlexAttention, even where fla is there
    assert choose("flex", ("grape_ap",)) == ("chunked", None)  # no FlexAttention form: chunked, nothing to report
    assert choose("flex", ("flex",), device="cpu")[0] == "chunked"
    assert choose("auto", ()) == ("chunked", None)


def test_without_fused_attention_module_only_flex_remains(monkeypatch):
    """A remote-code export ships model.py and chunked_attention.py only."""
    monkeypatch.setattr(model, "fused_attention", None)
    real = lambda fused: attention_path("auto", fused, "cuda", torch.bfloat16, 128, 64, 64)
    assert real(("flex",)) == ("flex", None)
    assert real(("fla", "flex")) == ("flex", None)
    path, why = real(("grape_ap",))
    assert path == "chunked" and "fused_attention.py is not importable" in why


def test_the_real_availability_probe_names_the_package(monkeypatch):
    for name in ("fla", "kernels"):
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed: import raises ImportError
    assert "fla-core is not installed" in fused_attention.unavailable("fla")
    assert "requirements.txt" in fused_attention.unavailable("fla")
    assert "kernels/grape_ap.py is not importable" in fused_attention.unavailable("grape_ap")
    with pytest.raises(ValueError, match="unknown fused kernel"):
        fused_attention.unavailable("flash")


# ------------------------------------------------------------------------------------ each path's wiring in attend


def fake_cuda(monkeypatch):
    """attend() chooses as it would on CUDA (the tensors stay on the CPU); returns the list of paths taken."""
    real, taken = model.attention_path, []

    def on_cuda(impl, fused, device_type, *rest, **kw):
        path, why = real(impl, fused, "cuda", *rest, **kw)
        taken.append(path)
        return path, why

    monkeypatch.setattr(model, "attention_path", on_cuda)
    return taken


def assert_same(a, b, tol):
    """Outputs and gradients agree to tol x max(1, the largest entry): GRAPE-A's omega gradient, a sum over every
    score, reaches ~50."""
    (ya, xa, ga), (yb, xb, gb) = a, b
    assert ya.abs().max() > 0.1 and xa.abs().max() > 0.1
    assert ga.keys() == gb.keys()
    for name, u, w in [("output", ya, yb), ("grad x", xa, xb)] + [(n, ga[n], gb[n]) for n in ga]:
        err, scale = (u - w).abs().max().item(), max(1.0, w.abs().max().item())
        assert err <= tol * scale, (name, err, scale)


def causal_softmax_attention(q, k, v, bias, scale):
    """softmax(q k^T scale + bias, causal) v in (B, H, T, D), written out (no SDPA), in fp32 or the inputs' wider
    dtype (fp64 stays fp64), returned in q's dtype."""
    T, dtype = q.size(2), torch.promote_types(q.dtype, torch.float32)
    s = (q.to(dtype) @ k.to(dtype).transpose(-1, -2)) * scale + bias
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return (s.softmax(-1) @ v.to(dtype)).to(q.dtype)


def reference_forgetting_attn(q, k, v, g, scale=None, window_size=None, cu_seqlens=None):
    """fla-core 0.6.0's parallel_forgetting_attn as documented: (B, T, H, D) layout, g (B, T, H) the per-step log
    forget gate, o_i = sum_{j <= i} softmax_j(q_i . k_j scale + G_i - G_j) v_j with G = cumsum(g), in q's dtype."""
    assert g.dtype == torch.float32 and g.shape == q.shape[:3] and window_size is None and cu_seqlens is None
    scale = q.size(-1) ** -0.5 if scale is None else scale
    G = g.cumsum(1).transpose(1, 2)  # (B, H, T)
    out = causal_softmax_attention(*(t.transpose(1, 2) for t in (q, k, v)), G[..., :, None] - G[..., None, :], scale)
    return out.transpose(1, 2)


def reference_grape_ap_attention(q, k, v, p_q, p_k, slopes, scale):
    """GRAPE-AP from its formula (GRAPE paper §5): b(t, j) = sum_{l=j+1..t} s_h logsigmoid(<p_q,t, p_k,l> / d_p)."""
    T, d_p = q.size(2), p_q.size(-1)
    psi = slopes[:, None, None] * F.logsigmoid(p_q @ p_k.transpose(-1, -2) / d_p)  # (B, H, t, l)
    psi = psi.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), 0.0)
    bias = psi.flip(-1).cumsum(-1).flip(-1) - psi  # sum over l > j
    return causal_softmax_attention(q, k, v, bias, scale)


@pytest.mark.parametrize("pe", ["fox", "grape_m+fox"])
def test_fla_path_feeds_the_per_step_gate(monkeypatch, pe):
    """attend -> fused_attention.forgetting_attention -> (the kernel, here fla's documented contract): equal to the
    chunked path in output and every gradient (the gate's through log_f), a composition included."""
    taken = fake_cuda(monkeypatch)
    fused_attention._LOADED["fla"] = (reference_forgetting_attn, None)
    attn = tiny_model(pe, kv_shift=True).transformer.h[1].attn.train()
    x = torch.randn(2, 37, attn.c_q.in_features)
    fla = layer_run(attn, x, "auto")
    assert taken == ["fla"]
    assert_same(layer_run(attn, x, "chunked"), fla, 1e-4)  # FoX's fp32 cumsum vs the re-centred fp64 one
    assert "additive.fgate.weight" in fla[2]


def test_grape_ap_kernel_gets_probes_and_slopes(monkeypatch):
    """The GRAPE-AP branch against the chunked path, with kernels.grape_ap standing in for the Triton kernel."""
    taken = fake_cuda(monkeypatch)
    calls = []

    def kernel(*args):
        calls.append(args)
        return reference_grape_ap_attention(*args)

    fake = types.ModuleType("kernels.grape_ap")
    fake.available, fake.grape_ap_attention = (lambda: True), kernel
    package = types.ModuleType("kernels")
    package.grape_ap = fake
    monkeypatch.setitem(sys.modules, "kernels", package)
    monkeypatch.setitem(sys.modules, "kernels.grape_ap", fake)
    attn = tiny_model("grape_m+grape_ap", kv_shift=True).transformer.h[0].attn.train()
    x = torch.randn(2, 29, attn.c_q.in_features)
    fused = layer_run(attn, x, "auto")
    assert taken == ["grape_ap"] and len(calls) == 1
    q, k, v, p_q, p_k, slopes, scale = calls[0]
    assert p_q.shape == p_k.shape == (2, 4, 29, 8) and torch.equal(slopes, attn.additive.slopes)
    assert scale == attn.scale
    assert_same(layer_run(attn, x, "chunked"), fused, ATOL)


def test_grape_ap_kernel_absent_falls_back_with_one_log_line(monkeypatch, caplog):
    taken = fake_cuda(monkeypatch)
    monkeypatch.setitem(sys.modules, "kernels", None)
    attn = tiny_model("grape_ap").transformer.h[0].attn.train()
    x = torch.randn(1, 20, attn.c_q.in_features)
    with caplog.at_level(logging.INFO, logger="model"):
        auto = layer_run(attn, x, "auto")
        layer_run(attn, x, "auto")
    assert taken == ["chunked", "chunked"]
    lines = [r.getMessage() for r in caplog.records if r.name == "model"]
    assert len(lines) == 1 and "GrapeAP takes the chunked path" in lines[0]
    assert "kernels/grape_ap.py is not importable" in lines[0]
    chunked = layer_run(attn, x, "chunked")
    assert torch.equal(auto[0], chunked[0]) and torch.equal(auto[1], chunked[1])


def test_cpu_auto_is_the_chunked_path_logged_once_per_reason(caplog):
    """On this machine: auto gives the chunked path's results bit for bit, one INFO line per PE and reason."""
    m = tiny_model("grape_a_qk").train()
    idx = torch.randint(0, 97, (2, 40))
    with caplog.at_level(logging.INFO, logger="model"):
        losses = []
        for impl in ("chunked", "auto", "auto"):
            for block in m.transformer.h:
                block.attn.attn_impl = impl
            losses.append(m(idx, targets=idx)[1])
    assert torch.equal(losses[0], losses[1]) and torch.equal(losses[0], losses[2])
    lines = [r for r in caplog.records if r.name == "model"]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO
    assert lines[0].getMessage() == ("attention: GrapeAQueryKeyGated takes the chunked path (device cpu: the fused "
                                     "kernels (flex) need CUDA)")


def test_cached_decoding_takes_the_chunked_path(monkeypatch):
    """Prefill (Tq = Tk) may be fused; every later step (Tq < Tk) is chunked, and the tokens match a full forward."""
    taken = fake_cuda(monkeypatch)
    fused_attention._LOADED["fla"] = (reference_forgetting_attn, None)
    m = tiny_model("fox", kv_shift=True)
    idx = torch.randint(0, 97, (1, 12))
    with torch.no_grad():
        full, _ = m(idx, all_logits=True)
        cache = m.new_cache()
        pieces = [m(idx[:, :8], cache=cache, all_logits=True)[0]]
        pieces += [m(idx[:, t:t + 1], cache=cache, all_logits=True)[0] for t in range(8, 12)]
    assert taken == ["fla"] * 4 + ["chunked"] * 8  # full forward and prefill, then 4 steps; 2 layers each
    assert (torch.cat(pieces, 1) - full).abs().max().item() <= 1e-4


# ------------------------------------------------------------------------------------------- FlexAttention padding


@pytest.fixture
def flex_backward_on_cpu(monkeypatch):
    """FlexAttention refuses a backward on the CPU (torch 2.13: `_validate_device`); its uncompiled reference
    implementation differentiates correctly all the same, so the padding's gradients can be checked here. A private
    name: if torch renames it, this fixture fails rather than skipping."""
    import torch.nn.attention.flex_attention as flex
    monkeypatch.setattr(flex, "_validate_device", lambda *args, **kw: None)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("T", [1, 63, 200])
@pytest.mark.parametrize("pe", ["alibi", "fox", "grape_a_q", "grape_a_k", "grape_a_qk", "rope+alibi"])
def test_flex_padding_values_and_gradients(monkeypatch, flex_backward_on_cpu, pe, T):
    """The model's flex path (lengths padded to a multiple of 128) against the chunked path: output, grad of x and
    of every parameter (GRAPE-A's omega and gate directions, FoX's gate). FoX to 1e-4: inside FlexAttention its bias
    is an fp32 difference c_i - c_j, not re-centred per block."""
    taken = fake_cuda(monkeypatch)
    real_flex = model.flex_pairwise_attention
    monkeypatch.setattr(model, "flex_pairwise_attention", lambda *a, **kw: real_flex(*a, **kw, compiled=False))
    monkeypatch.setitem(fused_attention._LOADED, "fla", (None, "fla-core is not installed"))  # FoX: flex
    attn = tiny_model(pe, kv_shift=True).transformer.h[1].attn.train()
    x = torch.randn(2, T, attn.c_q.in_features)
    flex = layer_run(attn, x, "auto")
    assert taken == ["flex"]
    chunked = layer_run(attn, x, "chunked")
    if T == 1:  # one token attends to itself: the output is v, the PE's gradients are exactly 0 on both paths
        assert all(flex[2][n].abs().max() == chunked[2][n].abs().max() == 0 for n in flex[2] if "additive" in n)
    assert_same(chunked, flex, 1e-4 if pe == "fox" else ATOL)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_padding_leaves_no_trace_of_the_pad():
    """Only the real queries come back; a key after every query, or garbage in the padded rows, changes nothing."""
    attn = tiny_model("grape_a_qk").transformer.h[0].attn
    x = torch.randn(1, 70, attn.c_q.in_features)
    with torch.no_grad():
        q, k, v, (qf, kf) = attn.qkv(x, torch.arange(70))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        out = flex_pairwise_attention(q, k, v, qf, kf, attn.additive.pair, compiled=False)
        ref = chunked_bias_attention(q, k, v, qf, kf, attn.additive.bias)
        assert out.shape == (1, 4, 70, 16) and (out - ref).abs().max().item() <= ATOL
        # the first 69 tokens' outputs cannot depend on the 70th (causality survives the padding)
        cut = lambda d, n: {name: t[:, :, :n] for name, t in d.items()}
        head = flex_pairwise_attention(q[:, :, :69], k[:, :, :69], v[:, :, :69], cut(qf, 69), cut(kf, 69),
                                       attn.additive.pair, compiled=False)
        assert (head - out[:, :, :69]).abs().max().item() <= ATOL


def test_block_mask_is_built_once_per_shape():
    a = _causal_block_mask(2 * FLEX_BLOCK, 2 * FLEX_BLOCK, 0, "cpu")
    assert _causal_block_mask(2 * FLEX_BLOCK, 2 * FLEX_BLOCK, 0, "cpu") is a
    assert _causal_block_mask(3 * FLEX_BLOCK, 3 * FLEX_BLOCK, 0, "cpu") is not a


# --------------------------------------------------------------------------------- fla itself (Triton interpreter)


@pytest.fixture
def fla_interpreted(monkeypatch):
    """fla's real kernel on the CPU, under the Triton interpreter (conftest.py sets TRITON_INTERPRET=1 before Triton
    loads). There is no GPU to time the autotuner's candidates on, so each kernel runs its first configuration."""
    if torch.cuda.is_available():
        return
    assert os.environ.get("TRITON_INTERPRET") == "1", "conftest.py sets TRITON_INTERPRET=1 on a machine without CUDA"
    from triton.runtime import autotuner
    monkeypatch.setattr(autotuner.Autotuner, "do_bench", property(lambda self: lambda fn, quantiles: [0.0] * 3))


@pytest.mark.filterwarnings("ignore:Triton is not supported on current platform")
def test_fla_kernel_equals_chunked(monkeypatch, fla_interpreted):
    """fla-core's parallel_forgetting_attn (fp32) against the chunked path: output and every gradient. Measured
    under the interpreter: differences ~1e-5 on gradients of magnitude ~10, outputs ~4e-7."""
    taken = fake_cuda(monkeypatch)
    attn = tiny_model("fox", kv_shift=True).transformer.h[1].attn.train()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    attn.to(device)
    x = torch.randn(2, 70, attn.c_q.in_features, device=device)
    assert fused_attention.unavailable("fla") is None
    fla = layer_run(attn, x, "auto")
    assert taken == ["fla"]
    assert_same(layer_run(attn, x, "chunked"), fla, 1e-4)


# ------------------------------------------------------------------------------------------- the config field


def test_auto_is_the_default_and_old_configs_keep_theirs(tmp_path):
    """A config without attn_impl (a checkpoint written before it existed) gets "auto"; one that says "chunked"
    keeps it through a checkpoint."""
    from checkpoint import save_model_only
    from eval.load import load

    values = tiny_config("fox").to_dict()
    assert values.pop("attn_impl") == "auto"
    assert build_config(values).model.attn_impl == "auto"
    assert build_config({**values, "attn_impl": "chunked"}).model.attn_impl == "chunked"
    ckpt = save_model_only(GPT(tiny_config("fox", attn_impl="chunked")), tmp_path / "run", step=1)
    loaded = load(ckpt, device="cpu")
    assert loaded.config.attn_impl == "chunked"
    assert all(block.attn.attn_impl == "chunked" for block in loaded.model.transformer.h)
    assert math.isfinite(loaded.model(torch.randint(0, 97, (1, 8)))[0].sum().item())
