"""Alias model, loading and resolution (pure: no network, no database)."""
