"""Window pooling: reference (``naive``), torch backend (``torch_prefix``), C++ wrapper (``cpu``),
Triton kernels (``triton_pool``), custom ops and autograd (``op``); the naming rule is in the README."""
