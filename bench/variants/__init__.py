"""A/B in one run: variants of the system under test (code, dependencies, interpreter,
settings, environment) measured side by side, round by round. See docs/ab.md."""
