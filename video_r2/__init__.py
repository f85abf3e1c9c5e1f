"""video-r2: timestamp-aware SFT and TAR-guided GRPO for Qwen2.5-VL, on PyTorch Lightning."""

__version__ = "0.1.0"
