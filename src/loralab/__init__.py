"""loralab: LoRA supervised fine-tuning from one command line."""

__version__ = "0.1.0"
