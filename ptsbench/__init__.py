"""ptsbench: a benchmark harness for post-training sparsity (PTS) methods on vision models."""

__version__ = "0.1.0"
