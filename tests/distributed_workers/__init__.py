"""Scripts that tests/test_distributed.py launches with torchrun on 2 CPU processes (gloo)."""
