"""Data-free distillation: NAYER (generator, losses, memory bank, label-text embeddings, module)."""
