"""The data layer: the dataset table and reading built splits, PK sampling, augmentation,
grain input pipelines and their worker processes."""
