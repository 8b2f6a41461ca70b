"""fastlora's benchmark suite: ``python -m benchmarks.run`` (see benchmarks/README section in the README)."""
