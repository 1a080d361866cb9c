"""The training client: contrastive methods with synthetic positives that
stream in from a generation pool."""
