"""GPU kernels (Triton). Imported lazily: nothing here is needed, or importable, on a CPU-only install."""
