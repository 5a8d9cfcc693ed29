"""Installs moduleformer_exit; kernels/ and training/ install as its subpackages (never top-level)."""
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent

setup(
    name="moduleformer-exit",
    version="0.1.0",
    description=(
        "ModuleFormer (IBM MoLM) mixture-of-experts language models on transformers 5: "
        "expert kernels, training, expert pruning and early-exit / contrastive decoding"
    ),
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    # kernels/, training/ and configs/ live at the top of the repo and are reached through committed symlinks
    # (moduleformer_exit/kernels -> ../kernels, ...), so they install as subpackages and never as top-level
    # modules (a top-level `kernels` would shadow the `kernels` package transformers looks for), and the source
    # tree imports the same way with an editable install, a regular one, or none.
    packages=[
        "moduleformer_exit",
        "moduleformer_exit.kernels",
        "moduleformer_exit.training",
        "moduleformer_exit.benchmarks",
        "moduleformer_exit.configs",
        "moduleformer_exit.data",
        "moduleformer_exit.search",
        "moduleformer_exit.evaluation",
        "moduleformer_exit.early_exit",
        "moduleformer_exit.pruning",
    ],
    package_data={
        "moduleformer_exit.configs": ["*.json", "**/*.json", "**/*.yaml", "recipes/*.json"],
        "moduleformer_exit.data": ["austen/*.txt", "austen/*.md"],
        "moduleformer_exit.search": ["*.json"],
        "moduleformer_exit.evaluation": ["tasks/*.yaml", "tasks/*.jsonl", "tasks/*.py"],
    },
    install_requires=[
        "torch>=2.4",
        "transformers>=5.3,<6",  # floor: the oldest release CI tests (.ci/run)
        "safetensors>=0.4",
        "numpy",
        "tqdm",
        "rich",
    ],
    extras_require={
        "train": ["deepspeed>=0.15", "datasets>=3", "accelerate>=1.0", "tokenizers>=0.20", "matplotlib", "tensorboard",
                  "peft>=0.13"],
        "gpu": ["triton>=3.6"],
        "search": ["matplotlib", "scipy"],
        "eval": ["lm-eval>=0.4.13,<0.5", "accelerate>=1.0"],
        "test": ["pytest>=8", "numpy", "triton>=3.6", "matplotlib", "scipy", "lm-eval>=0.4.13,<0.5",
                 "accelerate>=1.0"],
    },
    entry_points={"console_scripts": ["moduleformer-exit=moduleformer_exit.cli:main"]},
)
