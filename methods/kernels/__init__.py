"""Fast paths: FlexAttention wrappers and Triton kernels, each tested against a reference."""
