"""Evaluation and inference: metrics, simulated clicks, the predictor, automatic masks, robustness."""
