"""Helpers for testing lazyfs and things built on it: sources, fixtures, fault injection."""
