"""Frozen-feature evaluation: weighted kNN and linear probes (DINOv2 protocols)."""
