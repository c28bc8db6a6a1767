"""Retrieval: the saved-features format, CAM-weighted distances and exact ranking on the
device, k-reciprocal re-ranking, the datasets' evaluation protocols, the approximate
gallery index, and the numpy reference of the metrics."""
