"""Workflows that compose the layers below: the demo and the benchmark of every method."""
