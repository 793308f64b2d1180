"""leapformer_models: the model zoo built on leapformer_kernels' layers.

    import leapformer_models as lm
    model = lm.build("leapformer-lm", n_layer=2, attention="softmax")
    model = lm.load_checkpoint("runs/leapformer-lm-leap/ckpt.pt")   # eval mode

Console command: ``leapformer train|generate|eval|list`` (see models/README.md).
"""
from dataclasses import fields

from .deepsight import DeepSight
from .futureformer import FutureFormer
from .leap import LeapLSTM, LeapTransformer
from .lm import LeapformerLM, LeapformerLMLong
from .lra import LeapformerLRA
from .stream import LeapformerStream
from .softar import SoftAR

MODELS = {cls.name: cls for cls in (LeapformerLM, LeapformerLMLong, LeapLSTM, LeapTransformer, LeapformerLRA,
                                    DeepSight, LeapformerStream, FutureFormer,
                                    SoftAR)}


def get_model_class(name: str):
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(sorted(MODELS))}") from None


def list_models():
    """[(name, one-line description)] of every model."""
    return [(n, MODELS[n].description) for n in sorted(MODELS)]


def build(name: str, **config):
    """Build model ``name`` with its config dataclass's defaults overridden by ``config``."""
    cls = get_model_class(name)
    known = {f.name for f in fields(cls.Config)}
    unknown = set(config) - known
    if unknown:
        raise TypeError(f"{name} has no config field(s) {sorted(unknown)}; fields: {sorted(known)}")
    return cls(cls.Config(**config))


def load_checkpoint(path: str, map_location="cpu", with_tokenizer: bool = False):
    """The model saved at ``path`` in eval mode (and its tokenizer with ``with_tokenizer=True``)."""
    from .train import load_model
    model, tokenizer, _ = load_model(path, map_location)
    return (model, tokenizer) if with_tokenizer else model


__all__ = ["MODELS", "build", "load_checkpoint", "list_models", "get_model_class",
           "LeapformerLM", "LeapformerLMLong", "LeapLSTM", "LeapTransformer", "LeapformerLRA", "LeapformerStream"]
