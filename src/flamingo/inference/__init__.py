"""Inference: generation over interleaved images and text."""
