"""Seeing inside: in-step statistics, callbacks and plots."""
