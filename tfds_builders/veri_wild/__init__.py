"""VERI-Wild vehicle re-ID (manual download)."""
