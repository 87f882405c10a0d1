"""Benchmarks: cold-start runner, image builders, result tables."""
