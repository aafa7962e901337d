"""Identity of the custom ONNX node; the exporter, the ONNX function body and the TensorRT plugin all
read it from here, so they cannot disagree."""

NODE_DOMAIN = "vgrt"
NODE_TYPE = "MaskedAttention"
NODE_VERSION = 1
