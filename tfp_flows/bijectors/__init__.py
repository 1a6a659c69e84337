"""Normalizing-flow bijectors for TensorFlow Probability."""
