"""Public functional ops: validate, pick a backend, run it (DESIGN section 6)."""
from typing import Optional, Sequence, Tuple

import torch

from . import backends
from ._validate import check_attention, check_step, check_window_pool, effective_eps, step_args_ok
from .attention import op as attention_op
from .pooling import op as pooling_op

State = Tuple[torch.Tensor, torch.Tensor]


def leap_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pq: torch.Tensor, pk: torch.Tensor, *,
                   causal: bool = True, block_size: Optional[int] = None,
                   key_padding_mask: Optional[torch.Tensor] = None, cu_seqlens: Optional[torch.Tensor] = None,
                   initial_state: Optional[State] = None, output_final_state: bool = False,
                   eps: float = 1e-6, normalize: bool = True, backend: Optional[str] = None,
                   num_visible_keys: Optional[torch.Tensor] = None):
    """LeaPformer attention with learned proportions.

    Args:
        q: [B, T, H, Dk]; k: [B, S, Hkv, Dk]; v: [B, S, Hkv, Dv] (Hkv divides H: MQA / GQA).
        pq: [B, T, H], pk: [B, S, Hkv]: proportions (in [0, 1] normally), q's dtype or float32.
        causal: key s visible from query t iff s <= t (needs S == T). ``causal=False`` is
            non-causal / cross-attention (S may differ from T).
        block_size: with causal=True, block-causal: s visible iff s // W <= t // W.
        key_padding_mask: [B, S] bool, True = padded key (ignored), any mode.
        cu_seqlens: [N + 1] int32/int64 offsets of N packed sequences (B == 1, S == T).
        num_visible_keys: monotone cross-attention (wait-k decoders; with ``causal=False``, not with
            ``cu_seqlens``): int32/int64 [B, T] or [T], non-decreasing along t, values in [0, S];
            query t sees keys ``0 .. n[t]-1`` (and everything ``initial_state`` holds);
            ``key_padding_mask`` still applies; the final state is that of all S keys. It
            generalises causal (``n[t] = t + 1``) and block-causal attention. O(C (T + S)) work,
            no T x S buffer. The values are checked eagerly (skipped under torch.compile, where
            the op clamps them into [0, S] and makes them non-decreasing). See ``wait_k``.
        initial_state: (S0 [B or N, H, 2Dk, Dv], z0 [B or N, H, 2Dk]).
        output_final_state: also return the final state (S, z), float32 (float64 for float64 inputs).
        eps: clamp of the denominator, ``o = num / max(den, eps)`` (eps >= 0; at least the smallest
            normal float of the state dtype is used, so eps=0 gives 0 where nothing is visible;
            its gradient there is unbounded, so train with eps > 0).
        normalize: False returns ``num`` (no denominator).
        backend: "torch", "cpu", "triton" or None (automatic).

    Returns:
        o [B, T, H, Dv] in q's dtype, or (o, (S, z)) with output_final_state.

    Autograd: ``torch.autograd`` and the reverse-mode ``torch.func`` transforms (``grad``, ``vjp``,
    ``jacrev``, and ``vmap`` around them) differentiate to first order. Second derivatives raise
    ``RuntimeError`` ("leap_attention: double backward ... not supported"), and forward-mode AD
    (``torch.func.jvp``, ``jacfwd``) raises torch's ``RuntimeError`` asking for a ``jvp`` method.
    """
    check_attention(q, k, v, pq, pk, causal=causal, block_size=block_size, key_padding_mask=key_padding_mask,
                    cu_seqlens=cu_seqlens, initial_state=initial_state, output_final_state=output_final_state,
                    eps=eps, normalize=normalize, backend=backend, num_visible_keys=num_visible_keys)
    q, k, v = _autocast(q, k, v)
    name = backends.choose("leap_attention", backend, q.device, q.dtype)
    return attention_op.leap_attention(name, q, k, v, pq, pk, causal=causal, block_size=block_size,
                                       key_padding_mask=key_padding_mask, cu_seqlens=cu_seqlens,
                                       initial_state=initial_state, output_final_state=output_final_state,
                                       eps=effective_eps(eps, q.dtype), normalize=normalize,
                                       num_visible_keys=num_visible_keys)


def wait_k(num_queries: int, num_keys: int, lag: int, rate: float = 1.0, *,
           device: Optional[torch.device] = None) -> torch.Tensor:
    """The wait-k policy as ``num_visible_keys``: int64 [num_queries] with
    ``n[t] = min(lag + floor(rate * t), num_keys)``, t = 0 .. num_queries - 1.

    ``lag`` (k) source tokens are read before the first target token, then ``rate`` more per target
    token (rate = source tokens per target token, e.g. speech frames per word). Pass it to
    ``leap_attention(..., causal=False, num_visible_keys=wait_k(T, S, k, rate))``. ``floor`` is taken
    in float64 (exact for the rates and lengths that occur).
    """
    from ._validate import check_wait_k

    check_wait_k(num_queries, num_keys, lag, rate)
    t = torch.arange(num_queries, dtype=torch.float64, device=device)
    n = torch.floor(t * float(rate)) + float(min(int(lag), int(num_keys)))  # exact below 2**53
    return n.clamp_max(float(num_keys)).to(torch.int64)


def leap_attention_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pq: torch.Tensor, pk: torch.Tensor,
                        state: Optional[State] = None, *, eps: float = 1e-6, normalize: bool = True,
                        backend: Optional[str] = None):
    """Decode t >= 1 new tokens against a carried state (causal among the new tokens).

    q [B, t, H, Dk], k [B, t, Hkv, Dk], v [B, t, Hkv, Dv], pq [B, t, H], pk [B, t, Hkv];
    state (S [B, H, 2Dk, Dv], z [B, H, 2Dk]) or None (zeros).
    Returns (o [B, t, H, Dv], (S, z)) as fresh tensors; the input state is not modified.
    Equals ``leap_attention`` on the concatenation of everything decoded so far.
    """
    if torch.compiler.is_compiling() or not step_args_ok(q, k, v, pq, pk, state, eps, normalize, backend):
        check_step(q, k, v, pq, pk, state, eps=eps, normalize=normalize, backend=backend)
    q, k, v = _autocast(q, k, v)
    if torch.is_grad_enabled() and _requires_grad(q, k, v, pq, pk, state):
        # the step kernel is inference-only; with autograd on, the same result comes from the
        # differentiable op (DESIGN: the step equals leap_attention on the concatenation)
        name = backends.choose("leap_attention", backend, q.device, q.dtype)
        return attention_op.leap_attention(name, q, k, v, pq, pk, causal=True, block_size=None,
                                           key_padding_mask=None, cu_seqlens=None, initial_state=state,
                                           output_final_state=True, eps=effective_eps(eps, q.dtype),
                                           normalize=normalize)
    name = backends.choose("leap_attention_step", backend, q.device, q.dtype)
    return attention_op.leap_attention_step(name, q, k, v, pq, pk, state, eps=effective_eps(eps, q.dtype),
                                            normalize=normalize)


def _requires_grad(q, k, v, pq, pk, state) -> bool:
    if q.requires_grad or k.requires_grad or v.requires_grad or pq.requires_grad or pk.requires_grad:
        return True
    return state is not None and any(t is not None and t.requires_grad for t in state)


def leap_attention_step_(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pq: torch.Tensor, pk: torch.Tensor,
                         state: State, *, state_indices: Optional[torch.Tensor] = None, eps: float = 1e-6,
                         normalize: bool = True, backend: Optional[str] = None) -> torch.Tensor:
    """In-place decode step on a preallocated state pool, for serving and CUDA-graph decoding.

    q [B, t, H, Dk], k [B, t, Hkv, Dk], v [B, t, Hkv, Dv], pq [B, t, H], pk [B, t, Hkv];
    state (S [N, H, 2Dk, Dv], z [N, H, 2Dk]): float32, contiguous, updated in place;
    state_indices: int32/int64 [B], the pool row of each batch row (as flash-attn's
    ``cache_batch_idx``; distinct rows), or None for rows 0..B-1 (then N == B).
    Returns o [B, t, H, Dv]; afterwards ``state`` rows hold what ``leap_attention_step`` returns.
    Inference only (no autograd). The index values are checked (a host sync on CUDA) except
    inside a CUDA-graph capture, where the triton kernel clamps them into [0, N). On the triton
    backend one kernel reads and rewrites the rows (no copies); the torch and cpu backends
    gather the rows, run the step and scatter them back.
    """
    from ._validate import check_step_inplace

    check_step_inplace(q, k, v, pq, pk, state, state_indices, eps=eps, normalize=normalize, backend=backend)
    q, k, v = _autocast(q, k, v)
    S, z = state
    eps = effective_eps(eps, q.dtype)
    name = backends.choose("leap_attention_step", backend, q.device, q.dtype)
    if name == "triton":
        from .attention import triton_chunk

        return triton_chunk.step_(q, k, v, pq, pk, S, z, state_indices, eps, normalize)
    if state_indices is None:
        o, (S_new, z_new) = attention_op.leap_attention_step(name, q, k, v, pq, pk, (S, z), eps=eps,
                                                             normalize=normalize)
        S.copy_(S_new)
        z.copy_(z_new)
        return o
    rows = state_indices.long()
    o, (S_new, z_new) = attention_op.leap_attention_step(name, q, k, v, pq, pk, (S[rows], z[rows]), eps=eps,
                                                         normalize=normalize)
    S.index_copy_(0, rows, S_new)
    z.index_copy_(0, rows, z_new)
    return o


def window_pool(x: torch.Tensor, windows: Sequence[Tuple[int, int]], reduce: str = "mean",
                backend: Optional[str] = None):
    """Pool x [B, T, D] over windows (a, b) of offsets relative to each position t.

    ``pooled[b, t, w] = reduce(x[b, t+a .. t+b])`` over the part inside [0, T) (mean divides
    by that part's length; wholly outside gives 0); reduce is "sum", "mean" or "max" (ties
    send the gradient to the first maximal element).
    Returns pooled [B, T, len(windows), D] in x's dtype and valid [B, T, len(windows)] bool
    (True where the window lies wholly inside [0, T)).

    Offsets are ints (numpy integers too) in the int64 range; one beyond +-T acts as +-T, so
    ``(0, sys.maxsize)`` reads "from t to the end" and ``(-sys.maxsize, 0)`` "from the start".

    Non-finite values. max: a window that holds NaN gives NaN (as ``torch.amax``); its
    gradient goes to the window's first NaN (as ties go to the first maximal element), so the
    gradient stays finite. sum / mean: a window that holds NaN or +-inf gives a non-finite
    result; they work by prefix sums along T (O(T * D) per window whatever its length), so a
    non-finite value can also make windows after it NaN, in the same sequence and feature
    only; windows that end before it are exact. The backward is the same computation on the
    incoming gradient: a NaN or inf there can reach other positions of the same sequence and
    feature. Finite data is safe: the prefixes accumulate in float64 (the Triton kernel keeps
    a float32 in-block prefix, scaled by a power of two in blocks holding values above 2^120),
    so float32 / bfloat16 inputs up to the top of their range give finite, accurate sums
    wherever the true sum fits the dtype, and means always (float64 inputs: while T * max|x|
    stays below 1.8e308).

    Autograd as ``leap_attention``: first order under ``torch.autograd`` and the reverse-mode
    ``torch.func`` transforms; no double backward, no forward-mode AD.
    """
    windows = check_window_pool(x, windows, reduce, backend)
    (x,) = _autocast(x)
    if x.shape[0] == 0:  # an empty batch: empty outputs (still attached to x's graph), no kernel
        B, T, D = x.shape
        valid = torch.zeros(0, T, len(windows), dtype=torch.bool, device=x.device)
        return x.new_zeros(0, T, len(windows), D) + x.sum() * 0, valid
    name = backends.choose("window_pool", backend, x.device, x.dtype)
    return pooling_op.window_pool(name, x, windows, reduce)


def _autocast(*tensors):
    """Under ``torch.autocast`` for the tensors' device, run in the autocast dtype (as matmuls do)."""
    t = tensors[0]
    dev = "cpu" if t.is_cpu else "cuda" if t.is_cuda else None  # (no torch.device built per call)
    if dev is not None and torch.is_autocast_enabled(dev) and t.dtype != torch.float64:
        dtype = torch.get_autocast_dtype(dev)
        return tuple(t.to(dtype) for t in tensors)
    return tensors
