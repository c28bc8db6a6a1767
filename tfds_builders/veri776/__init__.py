"""VeRi-776 vehicle re-ID (manual download)."""
