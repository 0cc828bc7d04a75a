"""Graph side: site discovery, the FX rewrite, the compile backend and the steering op."""
