"""Evaluation: metrics, the protocols (one class each), the loop that runs them once per batch, the report.
Inference (predictor, automatic masks) is `sam_train.inference`."""
