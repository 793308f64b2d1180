"""nn.Module layers: the LeaP predictor, the attention layer, window pooling."""
from .attention import CosformerState, LeapAttention, RotaryState
from .leap import LeaP
from .pool import WindowPool

__all__ = ["CosformerState", "LeaP", "LeapAttention", "RotaryState", "WindowPool"]
