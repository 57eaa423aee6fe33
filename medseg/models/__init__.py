"""Network registry."""

from medseg.models.registry import (
    MODELS,
    ModelSpec,
    SliceWise,
    build_model,
    get_spec,
    register_model,
)

__all__ = ["MODELS", "ModelSpec", "SliceWise", "build_model", "get_spec", "register_model"]
