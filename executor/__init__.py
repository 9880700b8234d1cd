"""Real executor."""
