"""Runtimes: the embedded single-process simulation (default) and Flower's deployment engine."""
