"""The wire contract shared by the service and its clients.

Pure numpy and pydantic: a client without torch can build requests, decode
answers and compute cache keys.
"""

from clsp_positives.proto.codec import (
    DEFAULT_MAX_HEADER_BYTES,
    SUPPORTED_DTYPES,
    ModelShapes,
    check_anchors,
    check_latents,
    decode_request,
    decode_response,
    decode_safetensors,
    encode_request,
    encode_response,
    encode_safetensors,
    media_type,
    tensor_from_json,
    tensor_to_json,
)
from clsp_positives.proto.errors import ProtocolError
from clsp_positives.proto.keys import (
    canonical_anchors,
    canonical_latents,
    positive_key,
    positive_keys,
    seed_from_key,
    uint8_to_unit,
    unit_to_uint8,
)
from clsp_positives.proto.messages import (
    JSON_MEDIA_TYPE,
    SAFETENSORS_MEDIA_TYPE,
    ErrorBody,
    Health,
    ModelInfo,
    PositivesRequest,
    PositivesResponse,
    RequestArrays,
    ResponseArrays,
    Tensor,
)
from clsp_positives.proto.params import DEFAULT_MAX_K, GenerationParams, parse_params

__all__ = [
    "DEFAULT_MAX_HEADER_BYTES",
    "DEFAULT_MAX_K",
    "JSON_MEDIA_TYPE",
    "SAFETENSORS_MEDIA_TYPE",
    "SUPPORTED_DTYPES",
    "ErrorBody",
    "GenerationParams",
    "Health",
    "ModelInfo",
    "ModelShapes",
    "PositivesRequest",
    "PositivesResponse",
    "ProtocolError",
    "RequestArrays",
    "ResponseArrays",
    "Tensor",
    "canonical_anchors",
    "canonical_latents",
    "check_anchors",
    "check_latents",
    "decode_request",
    "decode_response",
    "decode_safetensors",
    "encode_request",
    "encode_response",
    "encode_safetensors",
    "media_type",
    "parse_params",
    "positive_key",
    "positive_keys",
    "seed_from_key",
    "tensor_from_json",
    "tensor_to_json",
    "uint8_to_unit",
    "unit_to_uint8",
]
