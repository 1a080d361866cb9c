"""The generation service: the HTTP app, the dynamic batcher, caches, metrics and settings;
the sampling core lives in ``sampling/`` and DDPM training in ``ddpm/`` (docs/design.md §3)."""
