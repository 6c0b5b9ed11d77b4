"""TwinFlow on Ray: train, sweep and serve one-step image generators."""

__version__ = "0.1.0"
