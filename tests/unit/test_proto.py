"""The checked-in gRPC code is exactly what the pinned grpcio-tools generates from proto/tidal/v1."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _load_generator():
    spec = importlib.util.spec_from_file_location("proto_generate", ROOT / "proto" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_code_is_up_to_date(tmp_path):
    gen = _load_generator()
    gen.generate(tmp_path)
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert fresh, "protoc produced nothing"
    stale = [str(rel) for rel in fresh if (tmp_path / rel).read_bytes() != (ROOT / "proto" / rel).read_bytes()]
    assert not stale, f"regenerate with `python proto/generate.py`; out of date: {stale}"


def test_enums_follow_buf_standard_zero_values():
    from tidal.v1 import admin_pb2, generation_pb2

    for enum in (generation_pb2.FinishReason, admin_pb2.InstanceState):
        zero = enum.Name(0)
        assert zero.endswith("_UNSPECIFIED")
        prefix = zero[: -len("UNSPECIFIED")]
        assert all(name.startswith(prefix) for name in enum.keys())
