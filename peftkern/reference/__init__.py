"""Plain-torch math of every op: the CPU implementation and the tests' float64 oracle."""
