"""Training: typed config, the train loop, optimizer/schedule, metrics and checkpoints. Run with `python -m train`."""
