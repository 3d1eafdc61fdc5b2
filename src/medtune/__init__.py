"""medtune: gated LoRA/QLoRA fine-tuning of small LLMs for medical question answering."""

__version__ = "0.1.0"
