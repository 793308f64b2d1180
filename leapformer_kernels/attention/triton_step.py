"""Triton decode step of LeaP attention: one launch for the whole batch.

One program per (batch x head, value tile) reads its slice of the state ``(S, z)`` once,
folds in the ``t >= 1`` new tokens one after another (token i sees tokens <= i), writes each
output row, and writes the new state once into fresh tensors (the input state is untouched).
No dots: the rows are vectors, the update is an outer product in registers.
Grid ``(batch x heads, value tiles)`` (``triton_chunk.step_grid``): B*H on axis 0, so decoding
with B*H >= 65536 launches (CUDA limits axes 1 and 2 to 65535). relu and the ``den`` clamp
keep NaN (``where``, not ``tl.maximum``), as on the other backends.

In place (``leap_attention_step_``: ``Sn``, ``zn`` are ``S0``, ``z0``): the state is read from and written back to
rows ``state_indices[b]`` of a preallocated pool ``(S [N, H, 2Dk, Dv], z [N, H, 2Dk])`` (row b
without indices). Each program then holds all ``Dv`` columns (one value tile), so the program
that rewrites ``z`` is the only one that reads it: no race. Indices are clamped into [0, N)
(unchecked under CUDA-graph capture: a bad index never reaches outside the pool).

No autotuning: one fixed config (``num_warps`` from the head size, chosen by the launcher), so
that the first call inside a CUDA-graph capture does not benchmark configs.
"""
import triton
import triton.language as tl

from .triton_fwd import HALF_PI, _clamp_den, _relu


@triton.jit(do_not_specialize=['T', 'N', 'eps'])
def leap_fwd_kernel_step(
    q, k, v, pq, pk, S0, z0, o, Sn, zn, idx,
    T, N, eps,
    H: tl.constexpr, G: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, USE_S0: tl.constexpr, NORMALIZE: tl.constexpr, HAS_IDX: tl.constexpr,
):
    i_nh, i_v = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_nh // H, i_nh % H
    if HAS_IDX:  # the pool row of batch row i_b, clamped into [0, N)
        i_row = tl.minimum(tl.maximum(tl.load(idx + i_b).to(tl.int64), 0), N - 1)
    else:
        i_row = i_b.to(tl.int64)
    i_st = i_row * H + i_h  # the state's (row, head)
    HKV: tl.constexpr = H // G
    i_hk = i_h // G
    bos = i_b.to(tl.int64) * T
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    m_s = m_k[:, None] & m_v[None, :]
    p_s = i_st * (2 * K * V) + o_k[:, None] * V + o_v[None, :]
    p_z = i_st * (2 * K) + o_k
    if USE_S0:
        b_hs = tl.load(S0 + p_s, mask=m_s, other=0.).to(tl.float32)
        b_hc = tl.load(S0 + p_s + K * V, mask=m_s, other=0.).to(tl.float32)
        b_zs = tl.load(z0 + p_z, mask=m_k, other=0.).to(tl.float32)
        b_zc = tl.load(z0 + p_z + K, mask=m_k, other=0.).to(tl.float32)
    else:
        b_hs = tl.zeros([BK, BV], dtype=tl.float32)
        b_hc = tl.zeros([BK, BV], dtype=tl.float32)
        b_zs = tl.zeros([BK], dtype=tl.float32)
        b_zc = tl.zeros([BK], dtype=tl.float32)
    for t in range(0, T):
        row = bos + t
        b_k = tl.load(k + (row * HKV + i_hk) * K + o_k, mask=m_k, other=0.).to(tl.float32)
        b_pk = tl.load(pk + row * HKV + i_hk).to(tl.float32)
        b_v = tl.load(v + (row * HKV + i_hk) * V + o_v, mask=m_v, other=0.).to(tl.float32)
        b_ak = _relu(b_k)
        b_ks = b_ak * tl.sin(b_pk * HALF_PI)
        b_kc = b_ak * tl.sin((1. - b_pk) * HALF_PI)  # cos(pi/2 p), exact at p = 1
        b_hs += b_ks[:, None] * b_v[None, :]
        b_hc += b_kc[:, None] * b_v[None, :]
        b_zs += b_ks
        b_zc += b_kc
        b_q = tl.load(q + (row * H + i_h) * K + o_k, mask=m_k, other=0.).to(tl.float32)
        b_pq = tl.load(pq + row * H + i_h).to(tl.float32)
        b_aq = _relu(b_q)
        b_qs = b_aq * tl.sin(b_pq * HALF_PI)
        b_qc = b_aq * tl.sin((1. - b_pq) * HALF_PI)
        b_o = tl.sum(b_qs[:, None] * b_hs, 0) + tl.sum(b_qc[:, None] * b_hc, 0)
        if NORMALIZE:
            b_den = tl.sum(b_qs * b_zs, 0) + tl.sum(b_qc * b_zc, 0)
            b_o = b_o / _clamp_den(b_den, eps)
        tl.store(o + (row * H + i_h) * V + o_v, b_o.to(o.dtype.element_ty), mask=m_v)
    tl.store(Sn + p_s, b_hs, mask=m_s)
    tl.store(Sn + p_s + K * V, b_hc, mask=m_s)
    if i_v == 0:
        tl.store(zn + p_z, b_zs, mask=m_k)
        tl.store(zn + p_z + K, b_zc, mask=m_k)
