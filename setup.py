"""Packaging for leapformer-kernels.

A plain install does not import torch (pip's isolated build would otherwise fetch a
multi-GB torch): the C++ extension in csrc/ is compiled with ninja on first use and
cached. Set ``LEAPFORMER_BUILD_EXT=1`` to build it ahead of time, inside the installed
environment, with ``python -c "import leapformer_kernels as lk; lk.build()"``.
The model zoo in models/ installs as ``leapformer_models``.
"""
from setuptools import setup

setup(
    name="leapformer-kernels",
    version="0.1.0",
    description="Fast, exact kernels for LeaPformer attention and a model zoo built on them",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=["leapformer_kernels", "leapformer_kernels.attention", "leapformer_kernels.pooling",
              "leapformer_kernels.layers", "leapformer_kernels.backends", "leapformer_models"],
    package_dir={"leapformer_models": "models"},
    package_data={"leapformer_kernels": ["csrc/*.cpp", "csrc/*.h"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "numpy",
        "ninja",
        "tqdm",
    ],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "numpy", "hypothesis", "matplotlib"],
        "bench": ["matplotlib", "pytest-benchmark"],
        "bpe": ["tokenizers"],
    },
    entry_points={"console_scripts": ["leapformer = leapformer_models.cli:main"]},
)
