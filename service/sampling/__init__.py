"""The sampling core: model loading, the UNet split, schedules, noise, kernels and the CLSP
sampler behind ``PositivesGenerator`` (docs/design.md, "The method")."""
