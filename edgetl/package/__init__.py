"""Stage 6: bundles for edge targets: reproducible archives, verification, accelerator compilers, C sources."""
