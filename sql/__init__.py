"""Numbered SQL migrations (shipped inside the casperd package as casperd.sql)."""
