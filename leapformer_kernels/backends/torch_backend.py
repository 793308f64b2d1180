"""The ``torch`` backend: pure PyTorch, any device, any float dtype; autograd backward."""
from ..attention.chunk import chunk_leap_attention
from ..pooling.prefix import prefix_window_pool


def unavailable(op, device, dtype):
    return None


def leap_attention(q, k, v, pq, pk, **kw):
    return chunk_leap_attention(q, k, v, pq, pk, **kw)


def leap_attention_step(q, k, v, pq, pk, state, *, eps, normalize):
    return chunk_leap_attention(q, k, v, pq, pk, causal=True, initial_state=state, output_final_state=True,
                                eps=eps, normalize=normalize)


def window_pool(x, windows, reduce):
    return prefix_window_pool(x, windows, reduce)
