from setuptools import find_packages, setup

setup(
    name="megallm",
    version="0.1.0",
    description="Megatron-style 3D-parallel LLaMA2 pretraining that runs, and is tested, on CPU",
    packages=find_packages(include=["megallm", "megallm.*"]),
    python_requires=">=3.10",
    install_requires=[
        # torch is pinned: a CPU build of exactly this version lies on the build machines' disk,
        # and an unpinned torch pulls a multi-GB CUDA build.
        "torch==2.13.0",
        "megatron-core==0.16.1",
        "numpy",
        "pyyaml",
        "sentencepiece",
        "safetensors",
        "tensorboard",
        "rich",
        "tqdm",
        "matplotlib",
    ],
    extras_require={
        "test": ["pytest", "pytest-timeout", "transformers", "ruff"],
        "ft": ["nvidia-resiliency-ext==0.4.1"],
        "gpu": ["nvidia-ml-py"],
    },
)
