"""Repo root on sys.path for tests (pytest imports this first)."""
