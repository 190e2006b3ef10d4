"""The chunked attention path (attn_impl="chunked") against the dense one (one (B, H, T, T) bias): same outputs and
gradients for every additive PE, and no T x T memory, neither in the forward, nor saved for, nor built in the
backward."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from chunked_attention import chunked_bias_attention, flex_pairwise_attention
from helpers import tiny_config, tiny_model
from model import ADDITIVE_PES, GPT

ATOL = 1e-5  # fp32, on outputs and on every gradient


pytestmark = pytest.mark.usefixtures("one_thread")


VARIANTS = [(pe, {}) for pe in ADDITIVE_PES] + [
    ("grape_ap", dict(grape_ap_tie="q")), ("grape_ap", dict(grape_ap_tie="k")),
    ("grape_ap", dict(grape_ap_tie="v", grape_ap_query_norm=True)), ("grape_ap", dict(grape_ap_query_norm=True)),
    ("rope+alibi", {}), ("grape_m+grape_ap", {}), ("grape_m_ctx+fox", {}), ("grape_m+grape_a_qk", {}),
]
VARIANT_IDS = [pe + "".join(f"-{k}={v}" for k, v in kw.items()) for pe, kw in VARIANTS]


def set_impl(model, impl, chunk=None):
    for block in model.transformer.h:
        block.attn.attn_impl = impl
        if chunk is not None:
            block.attn.attn_chunk_size = chunk


def layer_run(attn, x, impl, chunk=None, autocast=False):
    """One attention layer: its output, the gradient of x and of every parameter under a fixed random cotangent."""
    attn.attn_impl = impl
    if chunk is not None:
        attn.attn_chunk_size = chunk
    x = x.detach().requires_grad_()
    attn.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = attn(x, torch.arange(x.size(1)))
    cotangent = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    (y.float() * cotangent).sum().backward()
    grads = {name: p.grad.clone() for name, p in attn.named_parameters() if p.grad is not None}
    return y.detach().float(), x.grad.clone(), grads


def assert_same(a, b, atol):
    (ya, xa, ga), (yb, xb, gb) = a, b
    assert ya.abs().max() > 0.1 and xa.abs().max() > 0.1  # not trivially small
    assert (ya - yb).abs().max().item() <= atol, ("output", (ya - yb).abs().max().item())
    assert (xa - xb).abs().max().item() <= atol, ("grad x", (xa - xb).abs().max().item())
    assert ga.keys() == gb.keys()
    for name in ga:
        err = (ga[name] - gb[name]).abs().max().item()
        assert err <= atol, (name, err, ga[name].abs().max().item())  # absolute, though some grads reach ~15


# ---------------------------------------------------------------------------------------------------------- equality


@pytest.mark.parametrize("pe,kw", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("kv_shift", [False, True])
def test_layer_chunked_equals_dense(pe, kw, kv_shift):
    """T = 45 in blocks of 8 (T not a multiple of the block): outputs, grad of x and of every parameter."""
    attn = tiny_model(pe, kv_shift, **kw).transformer.h[1].attn.train()
    x = torch.randn(2, 45, attn.c_q.in_features)
    dense = layer_run(attn, x, "dense")
    chunked = layer_run(attn, x, "chunked", chunk=8)
    assert_same(dense, chunked, ATOL)
    assert set(chunked[2]) == {name for name, _ in attn.named_parameters()}  # every parameter got a gradient


@pytest.mark.parametrize("chunk", [1, 7, 16, 45, 64])
@pytest.mark.parametrize("pe", ["fox", "grape_a_qk", "grape_ap"])
def test_layer_chunk_sizes(pe, chunk):
    """Every block size gives the dense result, including blocks of one query, one block of exactly T and chunk > T."""
    attn = tiny_model(pe, kv_shift=True).transformer.h[0].attn.train()
    x = torch.randn(1, 45, attn.c_q.in_features)
    assert_same(layer_run(attn, x, "dense"), layer_run(attn, x, "chunked", chunk=chunk), ATOL)


@pytest.mark.parametrize("pe", ["alibi", "fox", "grape_a_q", "grape_a_k", "grape_a_qk", "grape_ap",
                                "grape_m+grape_ap"])
def test_layer_chunked_under_bf16_autocast_is_as_close_to_fp32_as_dense(pe):
    """CPU bf16 autocast: both paths round the same fp32 bias to bf16 for SDPA, but the rest of their rounding
    differs, so each is compared with the fp32 result: the chunked path must be about as close to it as the dense
    one, on the output, the grad of x and every parameter's grad."""
    attn = tiny_model(pe, kv_shift=True, embedding_init_std=0.02).transformer.h[0].attn.train()
    x = torch.randn(2, 40, attn.c_q.in_features)
    ref = layer_run(attn, x, "dense")
    dense = layer_run(attn, x, "dense", autocast=True)
    chunked = layer_run(attn, x, "chunked", chunk=16, autocast=True)
    flat = lambda r: {"output": r[0], "grad x": r[1], **r[2]}
    ref, dense, chunked = flat(ref), flat(dense), flat(chunked)
    assert (chunked["output"] - ref["output"]).abs().max() <= 0.01 * ref["output"].abs().max()
    for name in ref:
        scale = ref[name].abs().max().item()
        err_dense = (dense[name] - ref[name]).abs().max().item()
        err_chunked = (chunked[name] - ref[name]).abs().max().item()
        assert err_chunked <= 1.5 * err_dense + 2e-3 * scale, (name, err_chunked, err_dense, scale)


@pytest.mark.parametrize("pe", ADDITIVE_PES)
def test_bias_is_fp32_under_autocast(pe):
    """PE math stays in fp32 under bf16 autocast (GRAPE-AP's scan over up to T edge scores above all): only the
    finished bias is rounded, by the attention call."""
    attn = tiny_model(pe).transformer.h[0].attn
    pos = torch.arange(30)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        _, _, _, (qf, kf) = attn.qkv(torch.randn(1, 30, attn.c_q.in_features), pos)
        assert attn.additive.bias(qf, kf, pos, pos).dtype == torch.float32


@pytest.mark.parametrize("pe", ["grape_ap", "grape_m+grape_ap", "fox", "rope+alibi"])
def test_model_loss_and_parameter_gradients(pe):
    """The whole model: logits, loss and the gradient of every parameter agree."""
    model = tiny_model(pe, kv_shift=True).train()
    idx = torch.randint(0, 97, (2, 50))
    results = []
    for impl in ("dense", "chunked"):
        set_impl(model, impl, chunk=12)
        model.zero_grad(set_to_none=True)
        logits, loss = model(idx, targets=torch.roll(idx, -1, 1))
        loss.backward()
        results.append((logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (ld, gd), (lc, gc) = results
    assert (ld - lc).abs().max().item() <= ATOL
    for name in gd:
        assert (gd[name] - gc[name]).abs().max().item() <= ATOL, name


@pytest.mark.parametrize("pe", ["alibi", "fox", "grape_a_qk", "grape_ap", "grape_m+grape_a_k"])
def test_cached_decoding_with_small_blocks(pe):
    """Prefill and multi-token steps longer than a block, on a non-empty cache (queries = last Tq of Tk keys)."""
    model = tiny_model(pe, kv_shift=True)
    idx = torch.randint(0, 97, (2, 30))
    with torch.no_grad():
        set_impl(model, "dense")
        full, _ = model(idx, all_logits=True)
        set_impl(model, "chunked", chunk=4)
        cache = model.new_cache()
        pieces = [model(idx[:, :11], cache=cache, all_logits=True)[0],
                  model(idx[:, 11:20], cache=cache, all_logits=True)[0]]
        pieces += [model(idx[:, t:t + 1], cache=cache, all_logits=True)[0] for t in range(20, 30)]
    assert (torch.cat(pieces, 1) - full).abs().max().item() <= ATOL


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("pe", ["alibi", "fox", "grape_a_q", "grape_a_k", "grape_a_qk"])
def test_flex_score_mod_forward_equals_chunked(pe):
    """The FlexAttention path's score_mod (the PE's pair()) gives the chunked path's output. CPU, no gradients,
    uncompiled FlexAttention (the model uses the compiled form on CUDA only); 150 queries: not a multiple of
    FlexAttention's 128 block (padded to 256), nor of the chunk."""
    model = tiny_model(pe, kv_shift=True)
    attn = model.transformer.h[1].attn
    x = torch.randn(2, 150, attn.c_q.in_features)
    with torch.no_grad():
        q, k, v, (qf, kf) = attn.qkv(x, torch.arange(150))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        chunked = chunked_bias_attention(q, k, v, qf, kf, attn.additive.bias, chunk=32)
        flex = flex_pairwise_attention(q, k, v, qf, kf, attn.additive.pair, compiled=False)
    assert chunked.abs().max() > 0.1
    assert (flex - chunked).abs().max().item() <= ATOL


def test_flex_falls_back_to_chunked_on_cpu():
    """attn_impl="flex" trains on CPU through the chunked path (FlexAttention has no CPU backward in torch 2.13)."""
    model = tiny_model("grape_a_qk").train()
    idx = torch.randint(0, 97, (2, 40))
    losses = []
    for impl in ("chunked", "flex"):
        set_impl(model, impl)
        losses.append(model(idx, targets=idx)[1])
    losses[1].backward()
    assert torch.equal(losses[0], losses[1])


def test_default_is_auto_and_settings_are_checked():
    """The default picks a path per device (tests/test_attn_auto.py); on CPU that is the chunked one."""
    assert GPT(tiny_config("fox")).transformer.h[0].attn.attn_impl == "auto"
    with pytest.raises(ValueError, match="attn_impl"):
        tiny_config("fox", attn_impl="flash")
    with pytest.raises(ValueError, match="attn_chunk_size"):
        tiny_config("fox", attn_chunk_size=0)


# ---------------------------------------------------------------------------------------------------------- memory


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an operator returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def attention_memory(pe, impl, B=1, T=256, chunk=32):
    """(largest tensor any op makes in forward + backward, largest tensor saved for backward, total saved) of one
    attention layer, in elements."""
    attn = tiny_model(pe, kv_shift=True).transformer.h[0].attn.train()
    attn.attn_impl, attn.attn_chunk_size = impl, chunk
    x = torch.randn(B, T, attn.c_q.in_features, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with LargestTensor() as mode:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = attn(x, torch.arange(T))
        y.sum().backward()
    return mode.largest, max(saved), sum(saved)


@pytest.mark.parametrize("pe", ADDITIVE_PES + ("grape_m+grape_ap",))
def test_chunked_path_holds_no_t_by_t_tensor(pe):
    B, T, chunk, H, D = 1, 256, 32, 4, 16
    largest, largest_saved, total_saved = attention_memory(pe, "chunked", B, T, chunk)
    assert largest <= B * H * chunk * T  # one block's bias / scores; a T x T tensor would be 8x this
    assert largest_saved <= B * T * H * D  # q, k, v, out-sized at most
    assert total_saved <= 40 * B * T * H * D  # O(T): a few dozen per-token tensors, far below B*H*T*T = 16x this


def test_the_memory_check_catches_the_dense_path():
    """The measurement above is able to fail: the dense path builds and saves (B, H, T, T) tensors."""
    B, T, H = 1, 256, 4
    largest, largest_saved, _ = attention_memory("grape_ap", "dense", B, T)
    assert largest >= B * H * T * T and largest_saved >= B * H * T * T
