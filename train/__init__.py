"""Training: losses, models, the Lightning module and the Hydra entry point."""
