"""Stage 2: fine-tuning MobileNetV2 (freeze, then unfreeze), its training loop, checkpoints and DDP."""
