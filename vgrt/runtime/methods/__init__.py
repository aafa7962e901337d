"""One module per composition method, each with a typed request and a `compose` that returns images."""
