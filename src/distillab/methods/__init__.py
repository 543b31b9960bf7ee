"""Distillation methods, one module each, registered by name."""

from distillab.methods.base import Method, MethodOptions, available, build, get, register

__all__ = ["Method", "MethodOptions", "available", "build", "get", "register"]
