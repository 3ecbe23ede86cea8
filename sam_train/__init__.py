"""sam_train: train and fine-tune Segment Anything (SAM) models."""

__version__ = "0.1.0"
