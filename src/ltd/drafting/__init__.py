"""Drafters and draft-tree expansion."""
