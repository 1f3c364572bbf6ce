"""Random-weight checkpoints in the published layout, for tests, the demo and the benchmarks."""
