"""Plain PyTorch models, apart from any pipeline stage: DGIQA and the Depth Anything depth estimator."""
