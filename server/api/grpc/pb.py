"""The generated message and stub modules, regenerated first if ``proto/`` changed."""

from server.api.grpc import codegen

codegen.ensure()

from server.api.grpc._gen.loraplex.v1 import (  # noqa: E402
    adapters_pb2,
    adapters_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
)

__all__ = ["adapters_pb2", "adapters_pb2_grpc", "inference_pb2", "inference_pb2_grpc"]
