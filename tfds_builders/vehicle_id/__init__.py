"""VehicleID vehicle re-ID (manual download)."""
