"""engines/torch_caches.py: the exporters' per-call recomputations cached per process give the same answers,
and the installed libraries still have the shape the caches were written for (else the speed-up is gone)."""

from __future__ import annotations

import dataclasses

from llada_export.engines import torch_caches


def test_the_torchlib_table_is_cached_and_the_same():
    assert torch_caches.cache_torchlib_table()
    from torch.onnx._internal._lazy_import import onnxscript_apis  # what torch.onnx's registry calls

    cached = onnxscript_apis.get_torchlib_ops
    assert hasattr(cached, "once") and cached() is not cached()  # a fresh list each call, as before
    names = [(m.qualified_name, m.function.name) for m in cached()]
    assert len(names) > 300
    assert names == [(m.qualified_name, m.function.name) for m in cached.uncached()]


def test_the_export_schema_hints_are_resolved_once_and_the_same():
    import typing

    from torch._export.serde import schema, serialize

    assert torch_caches.cache_export_schema_hints() and serialize.typing.schema_hints_once
    classes = [c for c in vars(schema).values() if isinstance(c, type) and dataclasses.is_dataclass(c)]
    assert len(classes) > 20
    for c in classes:
        assert serialize.typing.get_type_hints(c, globalns=vars(schema)) == \
            typing.get_type_hints(c, globalns=vars(schema)), c
