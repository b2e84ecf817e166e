"""megallm: Megatron-style 3D-parallel LLaMA2 pretraining."""

__version__ = "0.1.0"
