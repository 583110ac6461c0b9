"""Fine-tuning on opinion scores with Ray Train: label data, depth cache, the training loop."""
