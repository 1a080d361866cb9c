"""Tools over a pool that are not training: ``clsp calibrate`` (which generation
settings keep the class) and ``clsp generate`` (offline banks), with the positive
quality measures they share (docs/design.md §1)."""
