"""PyTorch side: presets, conditioning features, attention processors, the conditioned UNet, weights."""
