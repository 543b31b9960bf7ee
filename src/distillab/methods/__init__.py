"""Distillation methods, one module each, registered by name."""

from distillab.methods.base import Method, MethodOptions, available, build, get, register, validate_options
from distillab.methods.capabilities import Stage

__all__ = ["Method", "MethodOptions", "Stage", "available", "build", "get", "register", "validate_options"]
