"""saelab: train, evaluate and apply sparse autoencoders on foundation-model activations."""

__version__ = "0.1.0"
