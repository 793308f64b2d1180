"""``linearize`` a ``transformers`` model in place, ``load`` a saved linearised one."""
import json
import os
from typing import Iterable, Optional

import torch
from torch import nn

from .attention import LeapSelfAttention, PaddingMask

# model_type -> (family, attribute of the decoder layer that holds the self-attention)
FAMILIES = {"gpt2": ("gpt2", "attn"), "llama": ("llama", "self_attn"), "mistral": ("llama", "self_attn"),
            "qwen2": ("llama", "self_attn")}
ATTENTIONS = ("leap", "linear")
CONFIG_KEY = "leapformer"  # the entry of model.config (config.json) that records the linearisation


def _decoder_layers(model):
    from transformers import PreTrainedModel
    if not isinstance(model, PreTrainedModel):
        raise ValueError(f"linearize needs a transformers PreTrainedModel (GPT-2, Llama, Mistral, Qwen2), "
                         f"got {type(model).__name__}")
    model_type = getattr(model.config, "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(f"unsupported architecture {type(model).__name__} (model_type {model_type!r}): "
                         f"lk.hf.linearize supports model_type {', '.join(map(repr, FAMILIES))}")
    family, attr = FAMILIES[model_type]
    base = model.base_model
    layers = getattr(base, "h" if family == "gpt2" else "layers", None)
    if not isinstance(layers, nn.ModuleList) or not all(hasattr(layer, attr) for layer in layers):
        raise ValueError(f"unsupported layout of {type(model).__name__}: no decoder layers with .{attr}")
    return base, layers, family, attr


def _layer_indices(layers, n: int):
    if layers is None:
        return list(range(n))
    if isinstance(layers, (int, str, bytes)) or not isinstance(layers, Iterable):
        raise ValueError(f"layers must be None or a list of layer indices, got {layers!r}")
    layers = list(layers)
    bad = [i for i in layers if isinstance(i, bool) or not isinstance(i, int) or not -n <= i < n]
    if bad:
        raise ValueError(f"layers {bad!r} are not layer indices of this model (it has {n} layers: 0..{n - 1}, "
                         f"or negative from the end)")
    out = sorted({i % n for i in layers})
    if not out:
        raise ValueError("layers is empty: pass None for every layer, or the indices to linearise")
    if len(out) != len(layers):
        raise ValueError(f"layers {layers!r} names a layer twice")
    return out


def _padding_hooks(base) -> PaddingMask:
    padding = getattr(base, "_leapformer_padding", None)
    if padding is None:
        padding = PaddingMask()
        base.register_forward_pre_hook(padding, with_kwargs=True)
        base.register_forward_hook(padding, with_kwargs=True, always_call=True)
        base.__dict__["_leapformer_padding"] = padding
    return padding


def linearize(model, attention: str = "leap", layers: Optional[Iterable[int]] = None, *,
              leap_hidden: Optional[int] = None, eps: float = 0.1, backend: Optional[str] = None):
    """Replace, in place, the self-attention of a ``transformers`` GPT-2 or Llama-family (Llama,
    Mistral, Qwen2) model by LeaP attention, and return the model.

    Each chosen layer's self-attention becomes a ``LeapSelfAttention`` that reuses the pretrained
    q, k, v, o projections (same modules, same parameter names) and GQA heads, and adds the two LeaP
    proportion predictors (``attention="leap"``: ``lk.LeaP(head_dim, leap_hidden)``, in the
    projections' dtype and device, freshly initialised: train them) or none
    (``attention="linear"``: plain relu linear attention, proportions 0). RoPE models: the
    proportions come from the unrotated relu(q), relu(k), and the model's own rotary embedding
    rotates q and k before the feature map, so for LeaP the rotation is an absolute position signal
    (relu of a rotated vector is not a rotation of relu), not the relative one it is for softmax.

    Args:
        model: a ``PreTrainedModel`` (``...ForCausalLM`` or the base model).
        attention: "leap" or "linear".
        layers: indices of the layers to linearise (None = all; negative from the end); the others
            keep their softmax attention (hybrid models). A model can be linearised again on other layers.
        leap_hidden: hidden width of the predictors (None = head_dim // 4).
        eps: denominator clamp (0.1, as ``lk.LeapAttention`` and the official code).
        backend: forwarded to ``lk.leap_attention`` (None = automatic).

    The model then generates through ``model.generate`` with a recurrent state (S, z) per LeaP layer
    (constant in the context length; see ``LeapCacheLayer``). Sliding windows (Mistral, Qwen2) do not
    apply to LeaP layers: they attend to the whole causal prefix. Padding comes from the 2D
    ``attention_mask`` given to the model (left or right; padded tokens never enter the state).
    The linearisation is recorded in ``model.config.leapformer``, so ``model.save_pretrained(path)``
    then ``lk.hf.load(path)`` rebuilds it.
    """
    base, decoder_layers, family, attr = _decoder_layers(model)
    if attention not in ATTENTIONS:
        raise ValueError(f"attention must be one of {', '.join(map(repr, ATTENTIONS))}, got {attention!r}")
    if leap_hidden is not None and (isinstance(leap_hidden, bool) or not isinstance(leap_hidden, int)
                                    or leap_hidden < 1):
        raise ValueError(f"leap_hidden must be an int >= 1 or None, got {leap_hidden!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < float("inf"):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    indices = _layer_indices(layers, len(decoder_layers))
    done = [i for i in indices if isinstance(getattr(decoder_layers[i], attr), LeapSelfAttention)]
    if done:
        raise ValueError(f"layers {done} are already linearised")
    config = model.config
    record = getattr(config, CONFIG_KEY, None) or {}
    if record and (record.get("attention"), record.get("leap_hidden"), record.get("eps")) != (
            attention, leap_hidden, float(eps)):
        raise ValueError(f"this model was linearised with {record}: linearise more layers with the same "
                         f"attention, leap_hidden and eps")
    padding = _padding_hooks(base)
    for i in indices:
        layer = decoder_layers[i]
        original = getattr(layer, attr)
        if getattr(original, "is_cross_attention", False):
            raise ValueError(f"layer {i} holds cross-attention, not self-attention")
        setattr(layer, attr, LeapSelfAttention(original, family, config, attention=attention,
                                               leap_hidden=leap_hidden, eps=eps, backend=backend,
                                               padding=padding))
    setattr(config, CONFIG_KEY, {"attention": attention, "layers": sorted(set(record.get("layers", [])) | set(indices)),
                                 "leap_hidden": leap_hidden, "eps": float(eps), "format": 1})
    return model


def leap_parameters(model):
    """The parameters that linearisation added (the LeaP predictors), e.g. to train them first with
    the pretrained weights frozen."""
    return [p for name, p in model.named_parameters() if ".leap_q." in name or ".leap_k." in name]


def _read_leap_tensors(path: str):
    """The LeaP predictor tensors of a checkpoint folder (safetensors, sharded or not, or a .bin)."""
    names = os.listdir(path)
    files = []
    if "model.safetensors.index.json" in names:
        with open(os.path.join(path, "model.safetensors.index.json")) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif "model.safetensors" in names:
        files = ["model.safetensors"]
    elif "pytorch_model.bin" in names:
        files = ["pytorch_model.bin"]
    else:
        raise ValueError(f"no model weights (model.safetensors or pytorch_model.bin) in {path}")
    out = {}
    for name in files:
        full = os.path.join(path, name)
        if name.endswith(".safetensors"):
            from safetensors import safe_open
            with safe_open(full, framework="pt") as f:
                for key in f.keys():
                    if ".leap_q." in key or ".leap_k." in key:
                        out[key] = f.get_tensor(key)
        else:
            sd = torch.load(full, map_location="cpu", weights_only=True)
            out.update({k: v for k, v in sd.items() if ".leap_q." in k or ".leap_k." in k})
    return out


def load(path: str, **kwargs):
    """Load a linearised model saved with ``model.save_pretrained(path)``.

    A stock ``from_pretrained`` would rebuild softmax attention and drop the LeaP predictors; this
    loads the model with ``from_pretrained(path, **kwargs)`` (its class from ``config.architectures``,
    else ``AutoModelForCausalLM``; ``kwargs`` such as ``dtype`` or ``device_map`` pass through),
    linearises the layers recorded in ``config.leapformer`` and loads the LeaP predictors.
    """
    import transformers
    from transformers import AutoConfig

    if not isinstance(path, (str, os.PathLike)) or not os.path.isdir(path):
        raise ValueError(f"lk.hf.load takes a folder written by save_pretrained, got {path!r}")
    path = os.fspath(path)
    config = AutoConfig.from_pretrained(path)
    record = getattr(config, CONFIG_KEY, None)
    if not isinstance(record, dict) or "layers" not in record:
        raise ValueError(f"{path} holds no linearised model (its config.json has no '{CONFIG_KEY}' entry): "
                         f"load it with from_pretrained")
    archs = getattr(config, "architectures", None) or []
    cls = getattr(transformers, archs[0], None) if archs else None
    cls = cls if cls is not None else transformers.AutoModelForCausalLM
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the LeaP tensors are "unexpected" to the softmax model
    try:
        model = cls.from_pretrained(path, **kwargs)
    finally:
        transformers.logging.set_verbosity(verbosity)
    setattr(model.config, CONFIG_KEY, None)
    linearize(model, attention=record.get("attention", "leap"), layers=record["layers"],
              leap_hidden=record.get("leap_hidden"), eps=record.get("eps", 0.1))
    tensors = _read_leap_tensors(path)
    own = {name for name in model.state_dict() if ".leap_q." in name or ".leap_k." in name}
    missing, extra = sorted(own - set(tensors)), sorted(set(tensors) - own)
    if missing or extra:
        raise ValueError(f"the LeaP predictors in {path} do not match the model: missing {missing[:4]}, "
                         f"unexpected {extra[:4]}")
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, t in tensors.items():
            params[name].copy_(t)
    return model
