"""LeaP attention: reference (``naive``), PyTorch chunked form (``chunk``), kernels, autograd glue."""
