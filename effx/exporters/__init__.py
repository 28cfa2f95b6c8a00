"""Exporters of Programs to deployable artifacts (``effx.exporters.onnx``)."""

from . import onnx

__all__ = ["onnx"]
