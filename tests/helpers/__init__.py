"""What tests (and benchmarks) share: synthetic data files, paths and environments, ports and servers, the stack."""
