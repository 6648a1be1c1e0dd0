"""Helpers shared by test modules (children, fixtures that are not pytest fixtures)."""
