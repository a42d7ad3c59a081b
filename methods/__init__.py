"""Method adapters (one module each), the Method protocol and the name registry."""

from methods.base import Artefact, Assignment, Cost, Method, MethodConfig, load_artefact
from methods.registry import available_methods, get_method, register

__all__ = [
    "Artefact", "Assignment", "Cost", "Method", "MethodConfig", "load_artefact",
    "available_methods", "get_method", "register",
]
