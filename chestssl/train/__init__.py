"""Training: the one loop every stage uses (:func:`chestssl.train.loop.fit`), devices, DDP, checkpoints."""
