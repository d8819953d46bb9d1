"""Headless engine: data, inference, training, evaluation, checkpoints."""
