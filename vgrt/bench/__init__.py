"""`vgrt bench`: timing harness, suites (unet, attention, export, compose), results as JSON, PNG and a markdown table.

Importing this package is light; each suite imports torch, ONNX Runtime and the exporter when it runs.
"""
