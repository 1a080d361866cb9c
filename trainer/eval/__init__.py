"""Evaluation of a backbone: the kNN and probe at every evaluation, the standard
linear protocol at the end (docs/training.md)."""
