"""megallm: Megatron-style 3D-parallel LLaMA2 pretraining."""

import warnings

__version__ = "0.1.0"

# nvidia-resiliency-ext pulls in the old `pynvml` package, and torch warns about it on every import
# of torch.cuda, in every rank's output. It is harmless here: NVML is only read by preflight.
warnings.filterwarnings("ignore", message="The pynvml package is deprecated")
# Megatron's linears warn on every construction when CUDA_DEVICE_MAX_CONNECTIONS is unset (it
# only matters for overlapping TP communication on GPU, where the launcher sets it).
warnings.filterwarnings("ignore", message="When using async grad allreduce it is recommended")
