"""Benchmarks of leapformer-kernels against PyTorch SDPA (softmax) and FLA.

    python -m benchmarks --help
"""
