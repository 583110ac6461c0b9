"""Plain PyTorch models, apart from any pipeline stage, and the registry of scorers built from them."""
