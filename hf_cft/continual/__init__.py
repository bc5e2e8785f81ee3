"""Continual-learning driver: task streams, strategies, accuracy matrices, checkpoint and resume."""
