"""Metrics and their networks."""
