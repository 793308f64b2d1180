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


def backward_function(op, name: str, message: str):
    """An ``autograd.Function`` that runs the backward custom op ``op`` below a transform's
    autograd level (with a vmap rule) and is not itself differentiable: its backward raises
    ``RuntimeError(message)`` (double backward is not supported)."""

    def forward(*args):
        return op(*args)

    def setup_context(ctx, inputs, output):
        pass

    def backward(ctx, *grads):
        raise RuntimeError(message)

    return type(name, (torch.autograd.Function,), dict(
        __doc__=f"{name}: the backward op ``{getattr(op, '__name__', op)}`` under torch.func; not differentiable.",
        generate_vmap_rule=True, forward=staticmethod(forward), setup_context=staticmethod(setup_context),
        backward=staticmethod(backward)))
