"""Loaders for real data sets available offline, and batch iterators."""
