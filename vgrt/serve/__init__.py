"""Serving vgrt over HTTP on Ray Serve (`vgrt serve`, `vgrt request`, `vgrt.client`).

vgrt.serve.protocol: request bodies and replies (no Ray); vgrt.serve.service: one model's warm
Composer and its routes (no Ray); vgrt.serve.app: the Ray Serve deployment and `build_app`, the
application entry point. Ray is imported only by vgrt.serve.app, when an application is built.
"""
