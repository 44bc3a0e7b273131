"""Pipeline wiring (no stage logic) and the helpers that compile or run it."""
