"""Two answers torch's exporters recompute at every call, computed once per process instead.

Both are pure functions of the installed libraries, so a per-process cache changes nothing but the time.
Each is installed only where the library still has the shape it was written for (else the library runs as
it is); :func:`install` is idempotent and is called before the first export or load.

- ``torch.onnx.export`` builds its registry of ONNX translations at every call; most of that is onnxscript's
  ``get_torchlib_ops``, which re-parses the source of each of its ~500 torchlib functions: 1.2 s of each
  graph's export on this project's 2-core CPU machine (8 graphs for ``make demo``, 13 for the full set).
  Cached: the table of the installed torchlib's functions (a fresh list of the same entries at each call;
  the registry, the export and its passes still run per graph).
- ``torch.export.load`` turns a program's JSON into torch's schema dataclasses and resolves each dataclass's
  type hints (``typing.get_type_hints`` on the schema module's string annotations) again for every node,
  tensor and argument it reads: half of the seconds of an Inductor ``Pipeline.load`` of the tiny engines
  there (13 programs: 8.8 s -> 4.3 s). Cached: each schema class's hints, resolved once (the
  deserialisation itself, node by node, still runs at every load).
"""

from __future__ import annotations

import functools
import importlib


def install() -> None:
    cache_torchlib_table()
    cache_export_schema_hints()


def torchlib_apis():
    """The onnxscript module ``torch.onnx`` takes its torchlib table from (torch names it in its lazy import,
    one per torch release), or None where this torch has none."""
    try:
        from torch.onnx._internal import _lazy_import

        return importlib.import_module(_lazy_import.onnxscript_apis._name)
    except (ImportError, AttributeError):
        return None


def cache_torchlib_table() -> bool:
    """onnxscript's ``get_torchlib_ops`` (in the module torch asks) made once per process; False where absent."""
    apis = torchlib_apis()
    made = getattr(apis, "get_torchlib_ops", None)
    if made is None:
        return False
    if hasattr(made, "once"):
        return True
    once = functools.cache(lambda: tuple(made()))

    def get_torchlib_ops():
        return list(once())

    get_torchlib_ops.once, get_torchlib_ops.uncached = once, made
    apis.get_torchlib_ops = get_torchlib_ops
    return True


def cache_export_schema_hints() -> bool:
    """``torch._export.serde.serialize``'s schema type hints resolved once per class; False where absent."""
    try:
        from torch._export.serde import serialize
    except ImportError:
        return False
    real, schema = getattr(serialize, "typing", None), getattr(serialize, "schema", None)
    if real is None or schema is None or not hasattr(real, "get_type_hints"):
        return False
    if getattr(real, "schema_hints_once", False):
        return True
    namespace = vars(schema)
    hints = functools.cache(lambda cls: real.get_type_hints(cls, globalns=namespace))

    class SchemaTyping:
        """``typing`` as serialize uses it, with the schema classes' hints resolved once."""

        schema_hints_once = True

        def __getattr__(self, name):
            return getattr(real, name)

        @staticmethod
        def get_type_hints(obj, globalns=None, localns=None, include_extras=False):
            if globalns is namespace and localns is None and not include_extras:
                return dict(hints(obj))
            return real.get_type_hints(obj, globalns, localns, include_extras)

    serialize.typing = SchemaTyping()
    return True
