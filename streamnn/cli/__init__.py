"""Thin command-line wrappers over the library; each module is one console script."""
