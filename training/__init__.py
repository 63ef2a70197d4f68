"""Training: the LightningModule, its recipe, and the train(cfg) entry point."""
