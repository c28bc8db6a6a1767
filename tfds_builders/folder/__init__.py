"""The user's own re-ID images (a folder layout or a CSV list), built by name."""
