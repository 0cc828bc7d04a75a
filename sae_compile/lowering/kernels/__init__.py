"""The arithmetic behind ``torch.ops.sae_compile.steer``.

``steer`` orders the paths and picks an implementation: ``triton_sae`` (fused kernels) on
CUDA when Triton is installed, ``torch_path`` (plain torch) everywhere else.
"""
