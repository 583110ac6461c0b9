"""Fine-tuning on opinion scores with Ray Train; ``train`` is the driver, the other modules are its parts.

``config``: the settings; ``init``: the model training starts from; ``loop``: what every worker runs; ``store``: the
files of a run; ``train_data``: the label map, the depth-map cache, the crops and the splits.
"""
