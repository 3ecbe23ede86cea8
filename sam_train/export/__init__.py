"""Export trained models: MAE to SAM weights, ONNX prompt encoder + mask decoder."""
