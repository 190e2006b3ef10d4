"""
GRAPE-AP attention (GRAPE paper §5, model.GrapeAP) as one Triton kernel for the forward and two for the backward;
nothing of size T x T exists in either.

    e(t, l)   = <p_q[t], p_k[l]> / d_p                  query probe, normalised rotated key probe (GrapeAP.features)
    psi(t, l) = alpha_h * logsigmoid(e(t, l))           <= 0
    b(t, j)   = sum_{l = j+1 .. t} psi(t, l)            b(t, t) = 0
    out_t     = sum_{j <= t} softmax_j(scale <q_t, k_j> + b(t, j)) v_j

Forward: one program per (block of BLOCK_M queries, batch x head) walks the key blocks from the diagonal back to
key 0, carrying per query row the path sum of the blocks already seen, carry(t) = sum_{l >= end of block} psi(t, l).
Inside a block b(t, j) = carry(t) + (sum of psi(t, l) over the block's l > j), a reverse cumulative sum along the
row, so b is built from the diagonal outwards as in the reference (no "row total - prefix" cancellation). The
softmax is online (running max and sum, as FlashAttention's). Saved: out and the log-sum-exp, O(B H T).

Backward, atomic-free (the pattern of stick-breaking attention kernels, e.g. flash-linear-attention's
parallel_stickbreaking_attn), with dS = P (dO v^T - delta), delta_t = <dO_t, out_t>:
    d psi(t, l) = sum_{j < l} dS(t, j) = -sum_{j >= l} dS(t, j)      (a softmax row of dS sums to 0; l >= 1)
    d e = alpha sigmoid(-e) d psi,   d alpha_h = sum d psi logsigmoid(e)
  pass 1, one program per query block, walks the keys as the forward does and carries both running sums (psi's and
    dS's); it writes dq, d p_q, per-program partial sums of d alpha, and for every key block it visits the two carries
    on entering it: snapshots of shape (B H, T / BLOCK_N, T), transient, a BLOCK_N-th of a T x T tensor;
  pass 2, one program per key block, the only writer of its dk, dv and d p_k, walks the query blocks from its
    diagonal to the end and starts each from the snapshots.

Numerics: scores, probabilities, path sums and every accumulator are fp32; q, k, v and P, dS enter the big products
in the inputs' dtype (bf16 under autocast; fp32 inputs as TF32 on a GPU, which FLOAT32_PRECISION selects). The probe
product runs in TF32x3 (about fp32's accuracy) on a GPU: the path sum adds up to T of its terms. Under the Triton
interpreter (TRITON_INTERPRET=1, CPU tensors, how the tests run it) every product is exact fp32.
Shapes: q, k (B, H, T, D), v (B, H, T, Dv), p_q, p_k (B, H, T, d_p), alpha (H,); any strides with a unit last one;
D, Dv, d_p up to 256 (padded to a power of two of at least 16 inside the kernel).
Tiles: 64 x 64 on a GPU (4 warps forward, 8 backward), untuned; scripts/gpu_check.py checks and times the kernel on
a GPU, tests/test_grape_ap_kernel.py checks it under the interpreter.
"""

import torch
import triton
import triton.language as tl

MAX_DIM = 256
FLOAT32_PRECISION = "tf32"  # for fp32 q, k, v on a GPU; "ieee" is exact and several times slower


def available():
    """Triton 3.0 or later (tl.cumsum(reverse=...), tl.dot(input_precision=...))."""
    return int(triton.__version__.split(".")[0]) >= 3


def grape_ap_attention(q, k, v, p_q, p_k, slopes, scale, block_m=None, block_n=None):
    """See the module docstring; returns (B, H, T, Dv) in q's dtype. Gradients to q, k, v, p_q, p_k and slopes.
    block_m / block_n: the tile sizes (powers of two of at least 16; default 64 on a GPU, 32 under the interpreter)."""
    default = 64 if q.is_cuda else 32
    return _GrapeAPAttention.apply(q, k, v, p_q, p_k, slopes, float(scale), block_m or default, block_n or default)


# ------------------------------------------------------------------------------------------------ device functions


@triton.jit
def _logsigmoid(x):
    """log sigmoid(x) = min(x, 0) - log1p(exp(-|x|)), log1p by Kahan's trick (accurate where exp(-|x|) << 1)."""
    u = tl.exp(-tl.abs(x))
    w = 1.0 + u
    log1p = tl.where(w == 1.0, u, tl.log(w) * (u / tl.where(w == 1.0, 1.0, w - 1.0)))
    return tl.minimum(x, 0.0) - log1p


@triton.jit
def _tile(ptr, rows, row_stride, n_rows, width, BW: tl.constexpr):
    """A (len(rows), BW) tile of a (rows, width) matrix with unit column stride; zeros outside it."""
    cols = tl.arange(0, BW)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < width)
    return tl.load(ptr + rows[:, None] * row_stride + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _store_tile(ptr, value, rows, row_stride, n_rows, width, BW: tl.constexpr):
    cols = tl.arange(0, BW)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < width)
    tl.store(ptr + rows[:, None] * row_stride + cols[None, :], value, mask=mask)


@triton.jit
def _keys(K, V, PK, l, sk_t, sv_t, spk_t, T, D, DV, DP, BD: tl.constexpr, BDV: tl.constexpr, BDP: tl.constexpr):
    """k, v and the key probes of the key rows l (zeros past T)."""
    return _tile(K, l, sk_t, T, D, BD), _tile(V, l, sv_t, T, DV, BDV), _tile(PK, l, spk_t, T, DP, BDP)


@triton.jit
def _at_head(ptr, bh, H, stride_b, stride_h):
    """A (B, H, T, .) tensor's pointer moved to batch x head bh."""
    return ptr + (bh // H) * stride_b + (bh % H) * stride_h


@triton.jit
def _path_bias(carry, psi):
    """b(t, j) = carry(t) + sum of psi(t, l) over the block's l > j: a reverse cumulative sum along each row."""
    return carry[:, None] + (tl.cumsum(psi, axis=1, reverse=True) - psi)


@triton.jit
def _edge(pq, pk, alpha, inv_dp, t, l, PROBE_PRECISION: tl.constexpr):
    """The block's edge terms: logsigmoid(e), psi (0 where l > t) and e, each (len(t), len(l)) fp32."""
    e = tl.dot(pq, tl.trans(pk), input_precision=PROBE_PRECISION) * inv_dp
    log_sig = _logsigmoid(e)
    psi = tl.where(l[None, :] <= t[:, None], alpha * log_sig, 0.0)
    return log_sig, psi, e


# ---------------------------------------------------------------------------------------------------------- forward


@triton.jit
def _forward(Q, K, V, PQ, PK, ALPHA, O, LSE,
             sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, spq_b, spq_h, spq_t, spk_b, spk_h, spk_t,
             H, T, D, DV, DP, scale, inv_dp,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
             BDP: tl.constexpr, PRECISION: tl.constexpr, PROBE_PRECISION: tl.constexpr):
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    Q, PQ = _at_head(Q, bh, H, sq_b, sq_h), _at_head(PQ, bh, H, spq_b, spq_h)
    K, V, PK = _at_head(K, bh, H, sk_b, sk_h), _at_head(V, bh, H, sv_b, sv_h), _at_head(PK, bh, H, spk_b, spk_h)
    t = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q = _tile(Q, t, sq_t, T, D, BD)
    pq = _tile(PQ, t, spq_t, T, DP, BDP)
    alpha = tl.load(ALPHA + bh % H)
    carry = tl.zeros([BLOCK_M], dtype=tl.float32)  # sum of psi(t, l) over the key blocks already walked
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BDV], dtype=tl.float32)
    last = (tl.minimum(pid_m * BLOCK_M + BLOCK_M, T) - 1) // BLOCK_N
    for i in range(0, last + 1):  # key blocks last, last-1, ..., 0
        l = (last - i) * BLOCK_N + tl.arange(0, BLOCK_N)
        k, v, pk = _keys(K, V, PK, l, sk_t, sv_t, spk_t, T, D, DV, DP, BD, BDV, BDP)
        _, psi, _ = _edge(pq, pk, alpha, inv_dp, t, l, PROBE_PRECISION)
        bias = _path_bias(carry, psi)
        carry += tl.sum(psi, axis=1)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale + bias
        s = tl.where(l[None, :] <= t[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet: keep exp() at 0, not NaN
        p = tl.exp(s - m_safe[:, None])
        correction = tl.exp(m_i - m_safe)
        l_i = l_i * correction + tl.sum(p, axis=1)
        acc = acc * correction[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    _store_tile(O + bh * T * DV, (acc / l_i[:, None]).to(O.dtype.element_ty), t, DV, T, DV, BDV)
    tl.store(LSE + bh * T + t, m_i + tl.log(l_i), mask=t < T)


# --------------------------------------------------------------------------------------------------------- backward


@triton.jit
def _queries(Q, PQ, DO, LSE, DELTA, bh, t, sq_t, spq_t, sdo_t, T, D, DV, DP,
             BD: tl.constexpr, BDV: tl.constexpr, BDP: tl.constexpr):
    """q, the query probes, dO, the log-sum-exp and delta of the query rows t (zeros past T)."""
    lse = tl.load(LSE + bh * T + t, mask=t < T, other=0.0)
    delta = tl.load(DELTA + bh * T + t, mask=t < T, other=0.0)
    return (_tile(Q, t, sq_t, T, D, BD), _tile(PQ, t, spq_t, T, DP, BDP), _tile(DO, t, sdo_t, T, DV, BDV), lse,
            delta)


@triton.jit
def _probabilities_and_ds(q, k, v, do, lse, delta, bias, scale, t, l, T, PRECISION: tl.constexpr):
    """P and dS of a (query block, key block) tile, 0 outside the causal triangle and on padding rows."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale + bias
    keep = (l[None, :] <= t[:, None]) & (t[:, None] < T)
    p = tl.where(keep, tl.exp(s - lse[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    return p, p * (dp - delta[:, None])


@triton.jit
def _edge_gradient(ds, carry_ds, psi_mask_t, l, alpha, log_sig, e):
    """d psi = -(sum of dS over keys >= l) on l in [1, t], then d e = alpha sigmoid(-e) d psi."""
    d_psi = -(carry_ds[:, None] + tl.cumsum(ds, axis=1, reverse=True))
    d_psi = tl.where((l[None, :] <= psi_mask_t[:, None]) & (l[None, :] >= 1), d_psi, 0.0)
    return d_psi, alpha * tl.sigmoid(-e) * d_psi


@triton.jit
def _backward_dq(Q, K, V, PQ, PK, ALPHA, DO, LSE, DELTA, DQ, DPQ, DALPHA, SNAP_PSI, SNAP_DS,
                 sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, spq_b, spq_h, spq_t, spk_b, spk_h, spk_t,
                 sdo_b, sdo_h, sdo_t,
                 H, T, D, DV, DP, NB, NM, scale, inv_dp,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
                 BDP: tl.constexpr, PRECISION: tl.constexpr, PROBE_PRECISION: tl.constexpr):
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    Q, PQ, DO = _at_head(Q, bh, H, sq_b, sq_h), _at_head(PQ, bh, H, spq_b, spq_h), _at_head(DO, bh, H, sdo_b, sdo_h)
    K, V, PK = _at_head(K, bh, H, sk_b, sk_h), _at_head(V, bh, H, sv_b, sv_h), _at_head(PK, bh, H, spk_b, spk_h)
    t = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q, pq, do, lse, delta = _queries(Q, PQ, DO, LSE, DELTA, bh, t, sq_t, spq_t, sdo_t, T, D, DV, DP, BD, BDV, BDP)
    alpha = tl.load(ALPHA + bh % H)
    carry = tl.zeros([BLOCK_M], dtype=tl.float32)
    carry_ds = tl.zeros([BLOCK_M], dtype=tl.float32)
    dq = tl.zeros([BLOCK_M, BD], dtype=tl.float32)
    dpq = tl.zeros([BLOCK_M, BDP], dtype=tl.float32)
    d_alpha = tl.zeros([BLOCK_M], dtype=tl.float32)
    last = (tl.minimum(pid_m * BLOCK_M + BLOCK_M, T) - 1) // BLOCK_N
    for i in range(0, last + 1):
        n = last - i
        l = n * BLOCK_N + tl.arange(0, BLOCK_N)
        tl.store(SNAP_PSI + (bh * NB + n) * T + t, carry, mask=t < T)  # the carries on entering key block n
        tl.store(SNAP_DS + (bh * NB + n) * T + t, carry_ds, mask=t < T)
        k, v, pk = _keys(K, V, PK, l, sk_t, sv_t, spk_t, T, D, DV, DP, BD, BDV, BDP)
        log_sig, psi, e = _edge(pq, pk, alpha, inv_dp, t, l, PROBE_PRECISION)
        bias = _path_bias(carry, psi)
        carry += tl.sum(psi, axis=1)
        p, ds = _probabilities_and_ds(q, k, v, do, lse, delta, bias, scale, t, l, T, PRECISION)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
        d_psi, de = _edge_gradient(ds, carry_ds, t, l, alpha, log_sig, e)
        carry_ds += tl.sum(ds, axis=1)
        d_alpha += tl.sum(d_psi * log_sig, axis=1)
        dpq += tl.dot(de, pk, input_precision=PROBE_PRECISION)
    _store_tile(DQ + bh * T * D, dq * scale, t, D, T, D, BD)
    _store_tile(DPQ + bh * T * DP, dpq * inv_dp, t, DP, T, DP, BDP)
    tl.store(DALPHA + bh * NM + pid_m, tl.sum(d_alpha, axis=0))


@triton.jit
def _backward_dkv(Q, K, V, PQ, PK, ALPHA, DO, LSE, DELTA, DK, DV_OUT, DPK, SNAP_PSI, SNAP_DS,
                  sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, spq_b, spq_h, spq_t, spk_b, spk_h, spk_t,
                  sdo_b, sdo_h, sdo_t,
                  H, T, D, DV, DP, NB, scale, inv_dp,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
                  BDP: tl.constexpr, PRECISION: tl.constexpr, PROBE_PRECISION: tl.constexpr):
    n, bh = tl.program_id(0), tl.program_id(1)
    Q, PQ, DO = _at_head(Q, bh, H, sq_b, sq_h), _at_head(PQ, bh, H, spq_b, spq_h), _at_head(DO, bh, H, sdo_b, sdo_h)
    K, V, PK = _at_head(K, bh, H, sk_b, sk_h), _at_head(V, bh, H, sv_b, sv_h), _at_head(PK, bh, H, spk_b, spk_h)
    l = n * BLOCK_N + tl.arange(0, BLOCK_N)
    k, v, pk = _keys(K, V, PK, l, sk_t, sv_t, spk_t, T, D, DV, DP, BD, BDV, BDP)
    alpha = tl.load(ALPHA + bh % H)
    dk = tl.zeros([BLOCK_N, BD], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BDV], dtype=tl.float32)
    dpk = tl.zeros([BLOCK_N, BDP], dtype=tl.float32)
    for m in range((n * BLOCK_N) // BLOCK_M, tl.cdiv(T, BLOCK_M)):  # the query blocks that see this key block
        t = m * BLOCK_M + tl.arange(0, BLOCK_M)
        q, pq, do, lse, delta = _queries(Q, PQ, DO, LSE, DELTA, bh, t, sq_t, spq_t, sdo_t, T, D, DV, DP, BD, BDV,
                                         BDP)
        carry = tl.load(SNAP_PSI + (bh * NB + n) * T + t, mask=t < T, other=0.0)
        carry_ds = tl.load(SNAP_DS + (bh * NB + n) * T + t, mask=t < T, other=0.0)
        log_sig, psi, e = _edge(pq, pk, alpha, inv_dp, t, l, PROBE_PRECISION)
        bias = _path_bias(carry, psi)
        p, ds = _probabilities_and_ds(q, k, v, do, lse, delta, bias, scale, t, l, T, PRECISION)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
        _, de = _edge_gradient(ds, carry_ds, t, l, alpha, log_sig, e)
        dpk += tl.dot(tl.trans(de), pq, input_precision=PROBE_PRECISION)
    _store_tile(DK + bh * T * D, dk * scale, l, D, T, D, BD)
    _store_tile(DV_OUT + bh * T * DV, dv, l, DV, T, DV, BDV)
    _store_tile(DPK + bh * T * DP, dpk * inv_dp, l, DP, T, DP, BDP)


# ---------------------------------------------------------------------------------------------- autograd Function


def _width(n):
    return max(16, triton.next_power_of_2(n))


def _strides(*tensors):
    """(batch, head, token) strides of each (B, H, T, ...) tensor, flattened."""
    return [s for x in tensors for s in x.stride()[:3]]


def _unit_last(x):
    return x if x.stride(-1) == 1 else x.contiguous()


class _GrapeAPAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, p_q, p_k, slopes, scale, block_m, block_n):
        B, H, T, D = q.shape
        DV, DP = v.size(-1), p_q.size(-1)
        if k.shape != q.shape or v.shape[:3] != q.shape[:3] or p_q.shape != p_k.shape or p_q.shape[:3] != q.shape[:3]:
            raise ValueError(f"grape_ap_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, "
                             f"p_q {tuple(p_q.shape)}, p_k {tuple(p_k.shape)}: expected (B, H, T, ...) alike")
        if max(D, DV, DP) > MAX_DIM:
            raise ValueError(f"grape_ap_attention: head dims {D}, {DV}, {DP}: at most {MAX_DIM}")
        q, k, v = (_unit_last(x) for x in (q, k, v))
        p_q, p_k = (_unit_last(x.float()) for x in (p_q, p_k))
        alpha = slopes.float().contiguous()
        out = torch.empty(B, H, T, DV, dtype=q.dtype, device=q.device)
        lse = torch.empty(B, H, T, dtype=torch.float32, device=q.device)
        meta = _meta(q, D, DV, DP, block_m, block_n)
        _forward[(triton.cdiv(T, block_m), B * H)](
            q, k, v, p_q, p_k, alpha, out, lse, *_strides(q, k, v, p_q, p_k),
            H, T, D, DV, DP, scale, 1.0 / DP, **meta)
        ctx.save_for_backward(q, k, v, p_q, p_k, alpha, out, lse)
        ctx.scale, ctx.blocks, ctx.slopes_dtype = scale, (block_m, block_n), slopes.dtype
        return out

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, p_q, p_k, alpha, out, lse = ctx.saved_tensors
        (B, H, T, D), DV, DP = q.shape, v.size(-1), p_q.size(-1)
        block_m, block_n = ctx.blocks
        d_out = _unit_last(d_out.to(q.dtype))
        delta = (d_out.float() * out.float()).sum(-1)  # (B, H, T) fp32, contiguous
        NB, NM = triton.cdiv(T, block_n), triton.cdiv(T, block_m)
        snap_psi = torch.empty(B * H, NB, T, dtype=torch.float32, device=q.device)
        snap_ds = torch.empty_like(snap_psi)
        dq = torch.empty(B, H, T, D, dtype=torch.float32, device=q.device)
        dk = torch.empty_like(dq)
        dv = torch.empty(B, H, T, DV, dtype=torch.float32, device=q.device)
        dpq = torch.empty(B, H, T, DP, dtype=torch.float32, device=q.device)
        dpk = torch.empty_like(dpq)
        d_alpha = torch.empty(B * H, NM, dtype=torch.float32, device=q.device)
        # 8 warps: a backward program holds two fp32 (block, D) accumulators beside its tiles
        meta = _meta(q, D, DV, DP, block_m, block_n, num_warps=8)
        strides = _strides(q, k, v, p_q, p_k, d_out)
        _backward_dq[(NM, B * H)](q, k, v, p_q, p_k, alpha, d_out, lse, delta, dq, dpq, d_alpha, snap_psi, snap_ds,
                                  *strides, H, T, D, DV, DP, NB, NM, ctx.scale, 1.0 / DP, **meta)
        _backward_dkv[(NB, B * H)](q, k, v, p_q, p_k, alpha, d_out, lse, delta, dk, dv, dpk, snap_psi, snap_ds,
                                   *strides, H, T, D, DV, DP, NB, ctx.scale, 1.0 / DP, **meta)
        d_slopes = d_alpha.view(B, H, NM).sum((0, 2)).to(ctx.slopes_dtype) if ctx.needs_input_grad[5] else None
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dpq, dpk, d_slopes, None, None, None


def _meta(q, D, DV, DP, block_m, block_n, num_warps=4):
    for name, size in (("block_m", block_m), ("block_n", block_n)):
        if size < 16 or size & (size - 1):
            raise ValueError(f"grape_ap_attention: {name} = {size}: expected a power of two of at least 16")
    on_gpu = q.is_cuda
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BD=_width(D), BDV=_width(DV), BDP=_width(DP),
                PRECISION=FLOAT32_PRECISION if on_gpu else "ieee",  # read for fp32 operands only
                PROBE_PRECISION="tf32x3" if on_gpu else "ieee",
                **(dict(num_warps=num_warps, num_stages=2) if on_gpu else {}))
