"""pathwsi: whole-slide image features and molecular predictors."""

__version__ = "0.1.0"
