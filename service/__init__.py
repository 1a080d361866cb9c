"""The generation service: model loading, the CLSP sampler, Triton kernels,
the dynamic batcher, caches and the FastAPI app."""
