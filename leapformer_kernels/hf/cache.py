"""The cache layer of a linearised attention layer: the recurrent state (S, z), constant in the
context length, inside any ``transformers`` ``Cache`` (``DynamicCache`` is what ``generate`` makes)."""
import torch
from transformers.cache_utils import CacheLayerMixin


class LeapCacheLayer(CacheLayerMixin):
    """One LeaP layer's entry of a ``transformers`` ``Cache``: ``state`` = (S [B, H, 2D, D],
    z [B, H, 2D]) float32 (None before the first call) and ``seen``, the number of positions (padded
    ones included) that went through the layer, which ``get_seq_length`` / ``get_mask_sizes``
    report so that the model's position ids and the masks of its softmax layers stay right.

    It holds no keys or values: memory is constant in the context length. A linearised layer puts
    one in place of whatever entry the cache had for it at its first call, so the ``DynamicCache``
    that ``generate`` builds works as is. Beam search (``reorder_cache``), ``num_return_sequences``
    (``batch_repeat_interleave``) and ``reset`` are supported; ``crop`` (assisted generation) is not:
    a recurrent state cannot be rolled back.
    """

    is_sliding = False
    is_compileable = False
    is_croppable = False
    supports_early_init = False

    def __init__(self, **kwargs):
        super().__init__()
        self.state = None
        self.seen = 0
        self.is_initialized = True

    def __repr__(self):
        shape = None if self.state is None else tuple(self.state[0].shape)
        return f"LeapCacheLayer(S={shape}, seen={self.seen})"

    def lazy_initialization(self, key_states=None, value_states=None, *args, **kwargs) -> None:
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        raise RuntimeError("this cache layer belongs to a LeaP (linearised) attention layer: it holds the state "
                           "(S, z), not keys and values")

    def get_mask_sizes(self, query_length, *args, **kwargs):
        q = query_length.shape[0] if isinstance(query_length, torch.Tensor) else int(query_length)
        return self.seen + q, 0

    def get_seq_length(self, *args, **kwargs) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:  # the name before transformers 5.x renamed it get_max_length
        return -1

    def _map(self, fn):
        if self.state is not None:
            self.state = tuple(fn(t) for t in self.state)

    def offload(self):
        self._map(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self):
        pass  # the layer moves the state to its device when it reads it

    def reset(self) -> None:
        self.state, self.seen = None, 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise RuntimeError("a LeaP layer's recurrent state cannot be cropped (assisted / speculative generation "
                               "needs a rollback that linear attention does not have)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices])


def leap_cache_layer(cache, layer_idx: int) -> LeapCacheLayer:
    """The ``LeapCacheLayer`` of layer ``layer_idx`` in ``cache``, put in place at the first call."""
    self_cache = getattr(cache, "self_attention_cache", cache)  # EncoderDecoderCache
    layers = self_cache.layers
    if layer_idx < len(layers) and isinstance(layers[layer_idx], LeapCacheLayer):
        return layers[layer_idx]
    while len(layers) <= layer_idx:  # a lazily grown DynamicCache (built without a config)
        make = getattr(self_cache, "layer_class_to_replicate", None)
        if make is None:
            raise ValueError(f"the cache {type(self_cache).__name__} has no entry for layer {layer_idx}")
        layers.append(make())
    old = layers[layer_idx]
    if old is not None and getattr(old, "is_initialized", False) and getattr(old, "keys", None) is not None \
            and old.keys.numel():
        raise ValueError(f"the cache holds softmax keys for layer {layer_idx}, which is now a LeaP layer: "
                         "start generation with a fresh cache")
    layers[layer_idx] = LeapCacheLayer()
    return layers[layer_idx]
