"""Benchmarks of the training application, each a module with ``main(argv)``."""
