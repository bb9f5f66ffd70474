"""Training: `train(cfg)` and the pieces it is made of."""
