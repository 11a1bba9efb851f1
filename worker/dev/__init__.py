"""Dev-only helpers (benchmarks, embedded servers, replay): imported by the CLI and the tests, never by the service."""
