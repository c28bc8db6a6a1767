"""The data layer: the dataset table and built splits, PK sampling, augmentation, grain input pipelines."""
