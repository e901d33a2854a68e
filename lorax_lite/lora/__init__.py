"""Multi-LoRA: per-slot adapter buffers in the model's linear layers, the batched delta, adapter loading and caching."""
