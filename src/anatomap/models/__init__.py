"""Encoders (a registry over MONAI networks) and small reusable heads."""

from anatomap.models.encoders import (
    Encoder,
    EncoderOutput,
    EncoderSpec,
    build_encoder,
    list_encoders,
    register_encoder,
)

__all__ = [
    "Encoder",
    "EncoderOutput",
    "EncoderSpec",
    "build_encoder",
    "list_encoders",
    "register_encoder",
]
