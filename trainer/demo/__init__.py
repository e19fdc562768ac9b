"""Bundled demo data: ISO 8601 dates (see dates.py)."""
