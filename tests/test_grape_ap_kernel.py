"""kernels/grape_ap.py, the Triton kernel of GRAPE-AP (forward and both backward passes), run on the CPU by Triton's
interpreter (conftest.py sets TRITON_INTERPRET=1; every product is then exact fp32):

- against GRAPE-AP's formula in fp64 (dense T x T, test_attn_auto's reference): the output and the gradients of q,
  k, v, both probes and the slopes, at T = 1, 63, 200, 256 (one and several blocks, ragged last blocks, query and
  key tiles of different sizes) and on strided inputs, the model's transposed (B, T, H, D) views;
- inside the model (attn_impl="auto" choosing the kernel as on CUDA): one attention layer against the chunked path,
  output and every parameter's gradient, with KV-shift, tied and normalised probes and the grape_m+grape_ap
  composition; and a whole model's loss and gradients.
Tolerance: max |difference| <= 1e-4 x max(1, the largest entry)."""

import os

import pytest
import torch
import torch.nn.functional as F

import fused_attention
from helpers import tiny_model
from test_attn_auto import assert_same, fake_cuda
from test_attn_auto import reference_grape_ap_attention as formula  # GRAPE-AP from its definition, dense
from test_attention_chunked import layer_run

assert os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available(), "conftest.py sets TRITON_INTERPRET=1"
from kernels.grape_ap import grape_ap_attention  # noqa: E402  (after the interpreter is chosen)

TOL = 1e-4
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


pytestmark = pytest.mark.usefixtures("one_thread")


def inputs(B, H, T, D, d_p, generator):
    """Random fp64 inputs shaped as the model's: q, k, v and the probes transposed views of (B, T, H, .) tensors,
    the key probes normalised to rms 1 (as GrapeAP.features gives them), ALiBi-like slopes."""
    rand = lambda *shape: torch.randn(*shape, generator=generator, dtype=torch.float64)
    q, k, v = (rand(B, T, H, D).transpose(1, 2) for _ in range(3))
    p_q = (2 * rand(B, T, H, d_p)).transpose(1, 2)
    p_k = F.normalize(rand(B, T, H, d_p), dim=-1).transpose(1, 2) * d_p ** 0.5
    slopes = torch.tensor([2.0 ** -(h + 1) for h in range(H)], dtype=torch.float64)
    return [q, k, v, p_q, p_k, slopes]


def assert_close(name, got, want):
    err, scale = (got.double() - want).abs().max().item(), max(1.0, want.abs().max().item())
    assert err <= TOL * scale, (name, err, scale)


@pytest.mark.parametrize("T, block_m, block_n", [(1, 16, 16), (63, 32, 32), (200, 64, 32), (256, 64, 64),
                                                  (200, 16, 64)])
def test_kernel_equals_the_formula(T, block_m, block_n):
    generator = torch.Generator().manual_seed(T)
    B, H, D, d_p = 2, 2, 16, 8
    exact = [x.requires_grad_() for x in inputs(B, H, T, D, d_p, generator)]
    scale = D ** -0.5
    want = formula(*exact, scale)
    cotangent = torch.randn(want.shape, generator=generator, dtype=torch.float64)
    want_grads = torch.autograd.grad(want, exact, cotangent)
    fp32 = [x.detach().float().to(DEVICE).requires_grad_() for x in exact]
    got = grape_ap_attention(*fp32, scale, block_m, block_n)
    got_grads = torch.autograd.grad(got, fp32, cotangent.float().to(DEVICE))
    assert got.dtype == torch.float32 and got.shape == (B, H, T, D)
    assert_close("output", got.cpu(), want)
    for name, g, w in zip(("q", "k", "v", "p_q", "p_k", "slopes"), got_grads, want_grads):
        assert g.shape == w.shape
        assert_close(name, g.cpu(), w)
    if T > 1:  # every gradient is exercised, not trivially zero
        assert all(w.abs().max() > 0.1 for w in want_grads)


def test_wide_tied_probes_and_a_first_key_that_no_path_crosses():
    """Probes as wide as the head (tie = q / k / v), and p_k[0]: psi(t, 0) enters no path sum (l > j >= 0), so its
    gradient is exactly 0."""
    generator = torch.Generator().manual_seed(5)
    exact = [x.requires_grad_() for x in inputs(1, 2, 90, 32, 32, generator)]
    want = formula(*exact, 0.2)
    cotangent = torch.randn(want.shape, generator=generator, dtype=torch.float64)
    want_grads = torch.autograd.grad(want, exact, cotangent)
    fp32 = [x.detach().float().to(DEVICE).requires_grad_() for x in exact]
    got_grads = torch.autograd.grad(grape_ap_attention(*fp32, 0.2), fp32, cotangent.float().to(DEVICE))
    for name, g, w in zip(("q", "k", "v", "p_q", "p_k", "slopes"), got_grads, want_grads):
        assert_close(name, g.cpu(), w)
    assert got_grads[4][:, :, 0].abs().max().item() == 0.0


def test_bad_shapes_and_tiles_are_refused():
    q = torch.randn(1, 2, 8, 16)
    p = torch.randn(1, 2, 8, 8)
    with pytest.raises(ValueError, match="expected \\(B, H, T, ...\\) alike"):
        grape_ap_attention(q, q[:, :, :4], q, p, p, torch.ones(2), 0.25)
    with pytest.raises(ValueError, match="block_m = 24: expected a power of two"):
        grape_ap_attention(q, q, q, p, p, torch.ones(2), 0.25, block_m=24)
    wide = torch.randn(1, 2, 8, 512)
    with pytest.raises(ValueError, match="at most 256"):
        grape_ap_attention(wide, wide, wide, p, p, torch.ones(2), 0.25)


# ------------------------------------------------------------------------------------------------ inside the model


@pytest.mark.parametrize("pe, kv_shift, extra", [
    ("grape_ap", False, {}),
    ("grape_ap", True, {}),
    ("grape_m+grape_ap", True, {}),
    ("grape_ap", False, dict(grape_ap_tie="k", grape_ap_query_norm=True)),
])
@pytest.mark.parametrize("T", [63, 130])
def test_layer_on_the_kernel_equals_the_chunked_path(monkeypatch, pe, kv_shift, extra, T):
    taken = fake_cuda(monkeypatch)
    attn = tiny_model(pe, kv_shift=kv_shift, **extra).transformer.h[1].attn.train()
    x = torch.randn(2, T, attn.c_q.in_features)
    assert fused_attention.unavailable("grape_ap") is None
    kernel = layer_run(attn, x, "auto")
    assert taken == ["grape_ap"]
    assert_same(layer_run(attn, x, "chunked"), kernel, TOL)


def test_model_loss_and_gradients_on_the_kernel(monkeypatch):
    taken = fake_cuda(monkeypatch)
    model = tiny_model("grape_m+grape_ap", kv_shift=True).train()
    idx = torch.randint(0, 97, (2, 96))

    def step(impl):
        for block in model.transformer.h:
            block.attn.attn_impl = impl
        model.zero_grad(set_to_none=True)
        loss = model(idx, targets=idx)[1]
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    kernel_loss, kernel_grads = step("auto")
    assert taken == ["grape_ap", "grape_ap"]
    chunked_loss, chunked_grads = step("chunked")
    assert abs(kernel_loss - chunked_loss) <= 1e-5
    assert kernel_grads.keys() == chunked_grads.keys()
    for name, g in chunked_grads.items():
        assert (kernel_grads[name] - g).abs().max().item() <= TOL * max(1.0, g.abs().max().item()), name
