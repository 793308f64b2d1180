"""``lk.hf``: linearise a Hugging Face ``transformers`` model (GPT-2, Llama, Mistral, Qwen2) with LeaP
attention and generate with an O(1) state per layer. Needs the ``[hf]`` extra (transformers, peft).

    import leapformer_kernels as lk
    model = lk.hf.linearize(model, attention="leap", layers=None)   # in place
    model.generate(ids, max_new_tokens=50)                            # (S, z) per LeaP layer
    model.save_pretrained(path); model = lk.hf.load(path)
    lk.hf.transfer_attention(model, batches, steps)                  # LeaP output -> softmax output, per layer
    model = lk.hf.finetune(model, batches, steps, lora=True).model   # next-token loss, LoRA merged back
"""
try:
    import transformers  # noqa: F401
except ImportError:
    raise ImportError('leapformer_kernels.hf needs transformers: pip install "leapformer-kernels[hf]"') from None

from .attention import LeapSelfAttention
from .cache import LeapCacheLayer
from .linearize import leap_parameters, linearize, load
from .transfer import TrainLog, evaluate_loss, finetune, token_batches, transfer_attention

__all__ = ["linearize", "load", "leap_parameters", "transfer_attention", "finetune", "evaluate_loss",
           "token_batches", "TrainLog", "LeapSelfAttention", "LeapCacheLayer"]
