"""Window pooling: reference (``naive``), PyTorch prefix-sum form (``prefix``), kernels, autograd glue."""
