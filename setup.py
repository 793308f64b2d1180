"""Packaging for leapformer-kernels.

Core install (the kernels): torch, numpy, ninja. Extras:

- ``[zoo]``: the model zoo's command (``leapformer train``: progress bars, loss plots) and the
  benchmarks: tqdm, matplotlib.
- ``[triton]``: the Triton kernels (CUDA builds of torch bring their own triton; on a CPU-only
  machine it is needed only for the interpreter tests).
- ``[bpe]``: ``--tokenizer bpe`` (the ``tokenizers`` package).
- ``[hf]``: ``lk.hf`` (linearise a Hugging Face model): transformers, peft.
- ``[test]``: what the test suite needs (zoo + triton + hf + pytest, hypothesis, pytest-benchmark).

A plain install does not import torch (pip's isolated build would otherwise fetch a multi-GB
torch): the C++ sources in ``csrc/`` ship inside the package (``leapformer_kernels/csrc`` in a
wheel) and are compiled with ninja on first use, then cached. ``leapformer build`` (or
``python -c "import leapformer_kernels as lk; lk.build()"``) builds them ahead of time.
The model zoo in ``models/`` installs as ``leapformer_models``.
"""
import os
import re

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def version() -> str:
    with open(os.path.join(HERE, "leapformer_kernels", "__init__.py")) as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


def readme() -> str:
    path = os.path.join(HERE, "README.md")
    return open(path).read() if os.path.exists(path) else ""


ZOO = ["tqdm", "matplotlib"]
TRITON = ["triton>=3.0; platform_system == 'Linux'"]
HF = ["transformers>=4.57,<6", "peft>=0.21,<1"]  # lk.hf; tested: transformers 4.57.6, 5.0.0, 5.17.0, 5.24.0

setup(
    name="leapformer-kernels",
    version=version(),
    description="Fast, exact kernels for LeaPformer attention and a model zoo built on them",
    long_description=readme(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=["leapformer_kernels", "leapformer_kernels.attention", "leapformer_kernels.pooling",
              "leapformer_kernels.layers", "leapformer_kernels.csrc",
              "leapformer_kernels.hf", "leapformer_models"],
    package_dir={"leapformer_models": "models", "leapformer_kernels.csrc": "csrc"},
    # every op family's folder (attention/, pooling/, common/): sources and headers
    package_data={"leapformer_kernels.csrc": ["*.cpp", "*.h", "*/*.cpp", "*/*.h"], "leapformer_models": ["README.md"]},
    install_requires=["torch>=2.4", "numpy", "ninja"],
    extras_require={
        "zoo": ZOO,
        "triton": TRITON,
        "bpe": ["tokenizers"],
        "hf": HF,
        "bench": ZOO + ["pytest-benchmark"],
        "test": ZOO + TRITON + HF + ["pytest", "pytest-benchmark", "hypothesis"],
    },
    entry_points={"console_scripts": ["leapformer = leapformer_models.cli:main"]},
)
