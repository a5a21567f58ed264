"""Few-shot evaluation suite (issue 6): benchmarks, protocol, metrics."""
