"""Synthetic vehicle re-ID dataset (rendered, no download)."""
