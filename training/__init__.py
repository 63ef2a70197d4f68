"""Training: the LightningModule, its recipe, and the train(cfg) entry point."""

from training import resolvers as _resolvers  # noqa: F401  (conf/config.yaml's resolvers, for any composition)
