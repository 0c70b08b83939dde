"""`python -m peftkern bench`: cases, providers, timing and reports (shared with benchmarks/)."""
