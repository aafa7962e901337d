"""ONNX export of conditioned UNets and the other components, the export contract and graph passes."""


def __getattr__(name: str):
    # Lazy: importing vgrt.export must not pull torch in.
    if name in ("export", "example_feed"):
        from vgrt.export import exporter, feeds

        return {"export": exporter.export, "example_feed": feeds.example_feed}[name]
    raise AttributeError(name)
