"""lora2gguf: a LoRA fine-tune in, trustworthy GGUF files out."""

__version__ = "0.1.0"
