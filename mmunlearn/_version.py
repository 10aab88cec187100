"""The package version (one place; mmunlearn/__init__.py and file metadata read it)."""

__version__ = "0.1.0"
