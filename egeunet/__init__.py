"""EGE-UNet reproducibility kit."""
