"""Simulated stragglers: the seeded models and the Keras callback. Optional: the core never imports it."""
