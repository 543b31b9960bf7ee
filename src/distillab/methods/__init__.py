"""Distillation methods, one module each, registered by name."""

from distillab.methods.base import Method, MethodOptions, Stage, available, build, get, register, validate_options

__all__ = ["Method", "MethodOptions", "Stage", "available", "build", "get", "register", "validate_options"]
