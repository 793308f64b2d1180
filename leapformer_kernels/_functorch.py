"""Whether a ``torch.func`` transform is active: the ops then run through ``autograd.Function``
wrappers of their custom ops (see ``attention/op.py``, ``pooling/op.py``)."""
import torch


def functorch_active() -> bool:
    """True inside a ``torch.func`` transform (grad, vjp, jacrev, vmap, ...); False while
    ``torch.compile`` traces (dynamo handles the transforms itself)."""
    if torch.compiler.is_compiling():
        return False
    peek = getattr(torch._C._functorch, "peek_interpreter_stack", None)
    return peek is not None and peek() is not None
