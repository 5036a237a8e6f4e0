"""Fine-tune GPT-J 6B with DeepSpeed."""
__version__ = "0.1.0"
