"""Dev-only helpers: replay and simulation for the demo (not used by the worker itself)."""
