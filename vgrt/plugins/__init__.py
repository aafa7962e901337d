"""Custom operators of vgrt and their backend forms (reference, ONNX, Triton, TensorRT plugin)."""
