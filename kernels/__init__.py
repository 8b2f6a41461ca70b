"""fastlora's Triton kernels (installed as ``fastlora.kernels``): @triton.jit code and configs only."""
