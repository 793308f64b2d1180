"""The LeaP proportion predictor."""
import torch
from torch import nn


class LeaP(nn.Module):
    """Learned proportion ``p = sigmoid(W2 relu(W1 x + b1) + b2)`` in (0, 1), per the paper's code.

    Applied by ``LeapAttention`` to ``relu(q)`` and ``relu(k)``, shared across heads.

    Args:
        head_dim: size D of the last axis of the input.
        hidden: width r of the hidden layer; None = ``max(1, head_dim // 4)`` (fairseq code),
            16 in the LRA code; ``1`` means the plain ``sigmoid(W x + b)``.

    Shapes: x [..., D] -> p [...].
    """

    def __init__(self, head_dim: int, hidden=None):
        super().__init__()
        if hidden is None:
            hidden = max(1, head_dim // 4)
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
            raise ValueError(f"hidden must be an int >= 1 or None, got {hidden!r}")
        if hidden == 1:
            self.net = nn.Sequential(nn.Linear(head_dim, 1), nn.Sigmoid())
        else:
            self.net = nn.Sequential(nn.Linear(head_dim, hidden), nn.ReLU(), nn.Linear(hidden, 1), nn.Sigmoid())
        self.head_dim, self.hidden = head_dim, hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, hidden={self.hidden}"
