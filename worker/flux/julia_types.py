"""Julia types as BSON.jl writes them: datatype names, parsed types, element types.

BSON.jl writes a type as a `datatype` document (`name`, a module path, and
`params`), names Base and Core as Main.Base / Main.Core up to Julia 1.3, and
writes every other tagged value as a document with a `tag` key.
"""
from __future__ import annotations

import dataclasses

import numpy as np

FLOAT_TYPES = {("Core", "Float32"): np.dtype("<f4"), ("Core", "Float64"): np.dtype("<f8"),
               ("Core", "Float16"): np.dtype("<f2")}
INT_TYPES = {("Core", "Int64"): np.dtype("<i8"), ("Core", "Int32"): np.dtype("<i4")}


def _dotted(name: tuple[str, ...]) -> str:
    return ".".join(name)


@dataclasses.dataclass(frozen=True)
class JType:
    """A parsed BSON.jl datatype: normalised name path and parameters."""
    name: tuple[str, ...]
    params: tuple = ()

    def __str__(self) -> str:
        if not self.params:
            return _dotted(self.name)
        return f"{_dotted(self.name)}{{{', '.join(_param_str(p) for p in self.params)}}}"


def _param_str(p) -> str:
    if isinstance(p, tuple):
        return "(" + ", ".join(":" + s for s in p) + ("," if len(p) == 1 else "") + ")"
    return str(p).lower() if isinstance(p, bool) else str(p)


def _array_type(dtype: np.dtype, rank: int) -> JType:
    elt = next(name for name, dt in FLOAT_TYPES.items() if dt == dtype)
    return JType(("Core", "Array"), (JType(elt), rank))


def normalise(path: list) -> tuple[str, ...]:
    """BSON.jl names Base and Core as Main.Base / Main.Core (Julia <= 1.3) or Base / Core."""
    name = tuple(path)
    if len(name) >= 2 and name[0] == "Main" and name[1] in ("Base", "Core"):
        name = name[1:]
    return name


def _type_name(node) -> tuple[str, ...] | None:
    """The normalised name of a datatype document, if it is one with a well-formed name."""
    if _tag(node) != "datatype":
        return None
    name = node.get("name")
    if isinstance(name, list) and name and all(isinstance(s, str) for s in name):
        return normalise(name)
    return None


def _tag(node) -> str | None:
    if isinstance(node, dict):
        tag = node.get("tag")
        return tag if isinstance(tag, str) else None
    return None
