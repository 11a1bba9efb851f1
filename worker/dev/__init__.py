"""Dev-only helpers (benchmarks, fault proxy, replay and simulation for the demo): imported by the CLI and the
tests, never by the service itself."""
