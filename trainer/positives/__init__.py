"""How the trainer gets its positives: the pool client, the sources (pool, offline ``.npy``,
none), and the prefetcher that keeps them ahead of training (docs/design.md)."""
