"""The trainer's data: image sets in memory or streamed from disk, epochs and
augmentation (docs/design.md §3)."""
