"""The arithmetic behind ``torch.ops.sae_compile.steer``. ``torch_path`` is the plain-torch
implementation used on every device."""
