"""Plain PyTorch models, apart from any pipeline stage: a file per model family, its builder and key remapping."""
