"""Stage 4: export to ONNX and TFLite (float32, int8): conversion and the float-equivalence checks."""
