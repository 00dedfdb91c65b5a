"""Context parallelism (torch.distributed, diffusers enable_parallelism) tests and their multi-rank harness."""
