"""Checkpoint readers: safetensors (Hugging Face layout) and GGUF."""
