"""Settings of a TensorRT engine build: which attention route, which plugin implementation, how hard to tune."""

from dataclasses import dataclass

from vgrt.errors import InvalidInputError

# plugin: vgrt::MaskedAttention nodes run the vgrt plugin (Triton kernel that skips masked tiles);
# native: they become the ONNX Attention op, which TensorRT (>= 10.14) lowers to its own fused attention.
ATTENTION_ROUTES = ("plugin", "native")
OPTIMIZATION_LEVELS = range(6)


@dataclass(frozen=True)
class BuildSettings:
    """How `vgrt build --backend tensorrt` turns an exported component into an engine.

    Args:
        component: the exported component to build (see the directory's manifest).
        attention: 'plugin' or 'native' (see ATTENTION_ROUTES).
        aot: with the plugin, bake its PTX into the engine (runs without Python) rather than calling
            the Python JIT implementation (the engine then needs vgrt to run).
        optimization_level: TensorRT's builder optimization level, 0-5 (default 3, TensorRT's own).
    """

    component: str = "unet"
    attention: str = "plugin"
    aot: bool = True
    optimization_level: int = 3

    def validate(self) -> None:
        if self.attention not in ATTENTION_ROUTES:
            raise InvalidInputError(
                f"unknown attention route {self.attention!r}; choose one of: {', '.join(ATTENTION_ROUTES)}"
            )
        if self.optimization_level not in OPTIMIZATION_LEVELS:
            raise InvalidInputError(f"optimization level must be 0-5, got {self.optimization_level}")

    def engine_fields(self) -> dict[str, object]:
        """The settings that change the engine's contents (part of its cache key)."""
        fields = {
            "component": self.component,
            "attention": self.attention,
            "optimization_level": self.optimization_level,
        }
        if self.attention == "plugin":
            fields["aot"] = self.aot
        return fields
