"""Training the pixel-space DDPM that the service samples from: presets, the loop, its CLI."""
