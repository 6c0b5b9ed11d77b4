"""Distributed TwinFlow training: job config, Ray Train launcher, DeepSpeed worker loop, checkpoints."""
