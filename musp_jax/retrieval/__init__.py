"""Retrieval: the saved-features format, CAM distances and exact ranking, re-ranking, dataset protocols, the approximate gallery index, the numpy reference."""
