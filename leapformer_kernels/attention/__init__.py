"""LeaP attention: reference (``naive``), torch backend (``torch_chunk``), C++ wrapper (``cpu``),
Triton kernels (``triton_*``), custom ops and autograd (``op``); the naming rule is in the README."""
