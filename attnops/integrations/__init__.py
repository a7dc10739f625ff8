"""Adapters that plug attnops into other libraries (optional dependencies, imported on demand)."""
