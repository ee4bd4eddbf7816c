"""The allowlist scanner: is this BSON.jl file a Flux model that sealbox will run?

It decides before BSON.jl or any evaluator touches the file. `BSON.load` can run
code (serialized closures), resolve any global, forge any struct or pointer and
call whatever sits in a callable slot, so the scanner accepts only a closed set
of shapes:

* the strict BSON layer (bson.py), then backrefs resolved with cycle and
  expansion-size (billion-laughs) checks;
* exactly one top-level value is a Flux model; every other top-level value and
  every unused `_backrefs` entry must be inert data (numbers, strings, float
  arrays, allowlisted types);
* the model is a tree of allowlisted layers (Chain, Dense, Conv, MaxPool,
  MeanPool, BatchNorm, Dropout, softmax, flatten, identity), each matched
  against the positional field layout of Flux 0.10 to 0.16, with its type
  parameters cross-checked against its data;
* a Conv's field count must fit the Flux releases the file's other layouts
  imply (FLUX_LAYOUTS): Conv{N,F,A,V} with 6 fields is Flux 0.8.0-0.8.2,
  Conv{N,M,F,A,V} with 6 fields 0.8.3-0.12.5, with 7 (groups) 0.12.6-0.16.11
  (src/layers/conv.jl at those Flux release tags); a 7-field Conv beside an
  8-field BatchNorm (<= 0.11) or a 6-field one with `bias = false` (0.13+) is a
  layout no Flux version writes, and is refused. Table with sources:
  worker/flux/README.md, "Layouts per Flux release";
* BatchNorm's Float64 μ, σ² beside Float32 β, γ (what Flux 0.10.0-0.11.6
  write) are accepted in the 8-field layout only, converted to β's type;
* callable slots (Dense.σ, Conv.σ, BatchNorm.λ) hold only allowlisted
  activation singletons: a closure-free gadget such as `Base.run` is as
  dangerous as a closure;
* shapes are propagated through the chain.

Places are written the way a Julia user would reach the value
(`model.layers[7].σ`, 1-based), or `_backrefs[i]` with BSON.jl's 1-based ref.

The accepted model comes back as plain layer records (records.py) holding numpy
views of the weights in numpy layout: a Julia array of size (d1, ..., dn) is
the row-major numpy array of shape (dn, ..., d1) over the same bytes, so every
per-dimension tuple (stride, pad, dilation, pooling window) is stored reversed
too.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os

import numpy as np

from . import bson
from .julia_types import (FLOAT_TYPES, INT_TYPES, JType, _array_type, _dotted, _param_str, _tag, _type_name,
                          normalise)
from .records import (ACCEPTED, NOT_A_MODEL, REFUSED, BatchNorm, Chain, Conv, Dense, Dropout, Function, Layer,
                      Model, Pool, Reason, Verdict, _act_name, _jl_tuple)
from .shapes import ShapeError, input_shape, layer_shape, leaves

MAX_EXPANDED_NODES = 1_000_000   # nodes after backref expansion; real models: a few thousand
MAX_REASONS = 50                  # enough to explain a refusal, bounded for hostile files
MAX_RANK = 8
MAX_ARRAY_ELEMENTS = 1 << 28
MAX_NESTING = 64                  # types inside types, Chains inside Chains

CLOSURE = "serialized closure (jl_anonymous): code in the model file"

# Activation singletons allowed in callable slots: type name -> activation id.
ACTIVATIONS = {
    ("NNlib", "#relu"): "relu",
    ("NNlib", "#σ"): "sigmoid",          # `const sigmoid = σ`: on disk it is #σ
    ("NNlib", "#sigmoid"): "sigmoid",
    ("NNlib", "#sigmoid_fast"): "sigmoid_fast",
    ("Base", "#tanh"): "tanh",
    ("NNlib", "#tanh_fast"): "tanh_fast",
    ("NNlib", "#leakyrelu"): "leakyrelu",
    ("NNlib", "#elu"): "elu",
    ("NNlib", "#selu"): "selu",
    ("NNlib", "#softplus"): "softplus",
    ("NNlib", "#gelu"): "gelu",          # old NNlib name of gelu_tanh (a shim keeps it loadable)
    ("NNlib", "#gelu_tanh"): "gelu",
    ("Base", "#identity"): "identity",
}
# Functions allowed as whole Chain layers (they act on the whole array).
LAYER_FUNCTIONS = {
    ("NNlib", "#softmax"): "softmax",
    ("MLUtils", "#flatten"): "flatten",
    ("Flux", "#flatten"): "flatten",
    ("Base", "#identity"): "identity",
}
LAYER_TYPES = ("Chain", "Dense", "Conv", "MaxPool", "MeanPool", "BatchNorm", "Dropout")
DATATYPE_NAMES = {np.dtype("<f4"): "FP32", np.dtype("<f8"): "FP64", np.dtype("<f2"): "FP16"}
RNG_SINGLETONS = {("Random", "TaskLocalRNG"), ("Random", "_GLOBAL_RNG")}
# Names that may appear in types (never instantiated from the file unless listed above).
TYPE_NAMES = (
    {("Flux", name) for name in LAYER_TYPES} | {("Flux", "Zeros")}
    | set(ACTIVATIONS) | set(LAYER_FUNCTIONS) | set(FLOAT_TYPES) | set(INT_TYPES) | RNG_SINGLETONS
    | {("Core", n) for n in ("Tuple", "Array", "Bool", "Nothing", "NamedTuple", "Any")}
    | {("Base", "Colon")}
)
TAG_KEYS = {
    "struct": {"tag", "type", "data"}, "datatype": {"tag", "name", "params"},
    "array": {"tag", "type", "size", "data"}, "tuple": {"tag", "data"}, "symbol": {"tag", "name"},
    "backref": {"tag", "ref"}, "ref": {"tag", "path"}, "svec": {"tag", "data"},
    "unionall": {"tag", "body", "var"}, "jl_bottom_type": {"tag"},
    "jl_anonymous": {"tag", "typename", "params"},
}


# The layouts whose field counts changed between Flux releases, and the releases that write each:
# (first release, first release that no longer writes it). Sources: Flux.jl's own source at each
# release tag, src/layers/conv.jl (struct Conv), src/layers/normalise.jl (BatchNorm, Dropout) and
# src/utils.jl (create_bias) / src/zeros.jl (Zeros); table and links in worker/flux/README.md.
_V = tuple
FLUX_NEXT = (0, 17, 0)            # after the newest release checked (0.16.11)
FLUX_LAYOUTS = {
    "Conv{N,F,A,V} with 6 fields": (_V((0, 8, 0)), _V((0, 8, 3))),
    "Conv{N,M,F,A,V} with 6 fields (no groups)": (_V((0, 8, 3)), _V((0, 12, 6))),
    "Conv{N,M,F,A,V} with 7 fields (groups)": (_V((0, 12, 6)), FLUX_NEXT),
    "BatchNorm with 8 fields": (_V((0, 8, 0)), _V((0, 12, 0))),      # 0.10.0-0.10.1 had 7: refused
    "BatchNorm with 11 fields": (_V((0, 12, 0)), FLUX_NEXT),
    "Dropout{F} with 2 fields": (_V((0, 8, 0)), _V((0, 9, 0))),
    "Dropout{F} with 3 fields": (_V((0, 9, 0)), _V((0, 10, 0))),
    "Dropout{F,D} with 3 fields": (_V((0, 10, 2)), _V((0, 13, 0))),
    "Dropout{F,D,R} with 4 fields": (_V((0, 13, 0)), FLUX_NEXT),
    "bias Flux.Zeros with a size": (_V((0, 11, 0)), _V((0, 12, 0))),
    "bias Flux.Zeros()": (_V((0, 12, 0)), _V((0, 14, 22))),
    "bias false": (_V((0, 13, 0)), FLUX_NEXT),
}


@dataclasses.dataclass(frozen=True)
class _Era:
    place: str
    layout: str
    first: tuple
    end: tuple

    @property
    def releases(self) -> str:
        first = ".".join(map(str, self.first))
        if self.end == FLUX_NEXT:
            return f"{first} and later"
        last = {(0, 8, 3): "0.8.2", (0, 9, 0): "0.8.x", (0, 10, 0): "0.9.x", (0, 12, 0): "0.11.x",
                (0, 12, 6): "0.12.5", (0, 13, 0): "0.12.x", (0, 14, 22): "0.14.21"}[self.end]
        return f"{first} to {last}"


class _Refuse(Exception):
    def __init__(self, place: str, message: str):
        super().__init__(f"{place}: {message}")
        self.reason = Reason(place, message)


_UNPARSED = object()   # a layer type parameter whose parse failed (see layer_struct)


class _Recorded(Exception):
    """A Chain failed; the reasons for its layers are already recorded."""


# ---------------------------------------------------------------- scan

class _Scan:
    def __init__(self, top: dict):
        self.top = top
        self.refs: list = []
        self.reasons: list[Reason] = []
        self.type_cache: dict[int, JType] = {}
        self.used_entries: set[int] = set()
        self.depth = 0
        self.type_errors: dict[str, _Refuse] = {}
        self.eras: list[_Era] = []     # which Flux releases write each layout met (FLUX_LAYOUTS)

    def written_by(self, place: str, layout: str) -> None:
        self.eras.append(_Era(place, layout, *FLUX_LAYOUTS[layout]))

    def check_conv_eras(self) -> None:
        """A Conv's field count must fit the Flux releases the rest of the file's layouts imply.

        Each Conv layout is written by one range of Flux releases (FLUX_LAYOUTS, with sources); a Conv
        whose range shares no release with another layout met in the same file (a BatchNorm, Dropout or
        bias layout, or another Conv) is a layout no Flux version writes, and is refused at the Conv."""
        for conv in (e for e in self.eras if e.layout.startswith("Conv")):
            for other in self.eras:
                if other is not conv and (other.first >= conv.end or conv.first >= other.end):
                    raise _Refuse(conv.place, f"{conv.layout} is written by Flux {conv.releases}, but "
                                              f"{other.place} ({other.layout}) only by Flux {other.releases}: "
                                              "no Flux version writes this layout")

    def refuse(self, reason: Reason) -> None:
        if len(self.reasons) < MAX_REASONS:
            self.reasons.append(reason)

    # ---- backrefs

    def check_backrefs(self) -> list[Reason]:
        """Validate every backref; raise on alias loops and on expansions beyond MAX_EXPANDED_NODES.

        Returns the cycles found: real closure files have them (TypeName -> Method -> TypeName),
        so they are reported after whatever the model check finds, not instead of it.
        """
        refs = self.top.get("_backrefs", [])
        if not isinstance(refs, list):
            raise _Refuse("_backrefs", "must be a BSON array")
        self.refs = refs
        # per entry (and the root, index -1): own node count and the entries it refers to
        local: dict[int, int] = {}
        edges: dict[int, list[int]] = {}
        root = {k: v for k, v in self.top.items() if k != "_backrefs"}
        for index, node, place in [(-1, root, "")] + [(i, e, f"_backrefs[{i + 1}]") for i, e in enumerate(refs)]:
            count, out = self._count(node, place)
            local[index], edges[index] = count, out
        # an entry that is itself a backref is an alias; a loop of aliases has no value at all
        for start, entry in enumerate(refs):
            seen = {start}
            while _tag(entry) == "backref":
                index = entry["ref"] - 1
                if index in seen:
                    raise _Refuse(f"_backrefs[{start + 1}]", "backref cycle: the entry refers to itself "
                                  "through backrefs only")
                seen.add(index)
                entry = refs[index]
        cycles: list[Reason] = []
        # iterative depth-first walk with colours: cycle detection and memoised sizes
        size: dict[int, int] = {}
        for start in range(len(refs)):
            if start in size:
                continue
            stack = [(start, iter(edges[start]))]
            on_path = {start: 0}
            path = [start]
            while stack:
                entry, it = stack[-1]
                nxt = next(it, None)
                if nxt is None:
                    stack.pop()
                    path.pop()
                    del on_path[entry]
                    size[entry] = min(MAX_EXPANDED_NODES + 1,
                                      local[entry] + sum(size[e] for e in edges[entry]))
                    continue
                if nxt in on_path:
                    cycle = path[on_path[nxt]:] + [nxt]
                    reason = Reason(f"_backrefs[{nxt + 1}]", "backref cycle: " + " -> ".join(
                        f"_backrefs[{e + 1}]" for e in cycle))
                    if reason not in cycles:
                        cycles.append(reason)
                    edges[entry] = [e for e in edges[entry] if e != nxt]   # count the rest once
                    continue
                if nxt not in size:
                    on_path[nxt] = len(path)
                    path.append(nxt)
                    stack.append((nxt, iter(edges[nxt])))
        total = local[-1] + sum(size[e] for e in edges[-1])
        if total > MAX_EXPANDED_NODES:
            raise _Refuse("_backrefs", f"backrefs expand the file to more than {MAX_EXPANDED_NODES} nodes "
                          "(a billion-laughs DAG)")
        return cycles

    def _count(self, node, place: str) -> tuple[int, list[int]]:
        """Nodes in this subtree not behind a backref, and the backref targets (0-based) met."""
        count, out = 0, []
        stack = [(node, place)]
        while stack:
            item, where = stack.pop()
            count += 1
            if isinstance(item, list):
                stack.extend((v, f"{where}[{i}]") for i, v in enumerate(item))
            elif isinstance(item, dict):
                if _tag(item) == "backref":
                    out.append(self._ref_index(item, where))
                else:
                    stack.extend((v, f"{where}.{k}" if where else k) for k, v in item.items())
        return count, out

    def _ref_index(self, node: dict, place: str) -> int:
        ref = node.get("ref")
        if set(node) != TAG_KEYS["backref"] or isinstance(ref, bool) or not isinstance(ref, int):
            raise _Refuse(place, "malformed backref: needs exactly tag and an integer ref")
        if not 1 <= ref <= len(self.refs):
            raise _Refuse(place, f"backref {ref} outside _backrefs (1..{len(self.refs)})")
        return ref - 1

    def deref(self, node):
        """Follow backrefs; the entries met count as checked by whoever checks the result."""
        while _tag(node) == "backref":
            index = node["ref"] - 1     # validated in check_backrefs
            self.used_entries.add(index)
            node = self.refs[index]
        return node

    def peek(self, node):
        """Follow backrefs only to look (messages, finding the model)."""
        while _tag(node) == "backref":
            node = self.refs[node["ref"] - 1]
        return node

    @contextlib.contextmanager
    def nested(self, place: str):
        """Bound recursion through backref chains (types in types, chains in chains)."""
        if self.depth >= MAX_NESTING:
            raise _Refuse(place, f"types or layers nested deeper than {MAX_NESTING} levels")
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1

    # ---- danger sweep: name the worst thing inside a refused value

    def danger(self, node, place: str) -> Reason | None:
        seen: set[int] = set()
        stack = [(node, place)]
        while stack:
            item, where = stack.pop()
            if isinstance(item, list):
                stack.extend(reversed([(v, f"{where}[{i + 1}]") for i, v in enumerate(item)]))
                continue
            if not isinstance(item, dict):
                continue
            tag = _tag(item)
            if tag == "backref":
                index = item["ref"] - 1
                if index not in seen:
                    seen.add(index)
                    stack.append((self.refs[index], where))
                continue
            if tag == "jl_anonymous":
                return Reason(where, CLOSURE)
            if tag == "ref":
                return Reason(where, f"module reference (ref {_path_text(item.get('path'))}): "
                                     "resolves any global by name")
            if (_type_name(item) or ())[:2] == ("Core", "Ptr"):
                return Reason(where, "raw pointer type (Core.Ptr): forged pointers are never allowed")
            stack.extend(reversed([(v, f"{where}.{k}") for k, v in item.items() if k != "tag"]))
        return None

    def describe(self, node) -> str:
        node = self.peek(node)
        if node is None:
            return "nothing"
        if isinstance(node, bool):
            return f"the boolean {str(node).lower()}"
        if isinstance(node, (int, float)):
            return f"the number {node!r}"
        if isinstance(node, str):
            return "a string"
        if isinstance(node, memoryview):
            return "raw bytes"
        if isinstance(node, list):
            return "a plain array"
        tag = _tag(node)
        if tag is None:
            return "an untagged document"
        if tag == "struct":
            typ = self.peek(node.get("type"))
            if _tag(typ) == "jl_anonymous":
                return "a serialized closure"
            if _type_name(typ):
                return f"a value of type {_dotted(_type_name(typ))}"
            return "a struct"
        if _type_name(node):
            return f"the type {_dotted(_type_name(node))}"
        if tag in TAG_KEYS:
            return f"{'an' if tag == 'array' else 'a'} {tag} document"
        return f"a document with unknown tag {tag!r}"

    def refuse_value(self, node, place: str, expected: str) -> _Refuse:
        found = self.danger(node, place)
        if found is not None:
            return _Refuse(found.place, found.message)
        return _Refuse(place, f"holds {self.describe(node)}; expected {expected}")

    # ---- types

    def jtype(self, node, place: str, trail: tuple[int, ...] = ()) -> JType:
        """Parse a datatype; errors inside parameters name them as `place (type parameter 1.2)`."""
        target = self.deref(node)
        if trail:
            place = place.split(" (type parameter ")[0] + f" (type parameter {'.'.join(map(str, trail))})"
        key = id(target)
        if key in self.type_cache:
            return self.type_cache[key]
        tag = _tag(target)
        if tag == "jl_anonymous":
            raise _Refuse(place, CLOSURE)
        if tag != "datatype":
            raise self.refuse_value(target, place, "a datatype")
        if set(target) != TAG_KEYS["datatype"]:
            raise _Refuse(place, f"datatype with keys {sorted(target)}, expected {sorted(TAG_KEYS['datatype'])}")
        raw_name, raw_params = target["name"], target["params"]
        if not (isinstance(raw_name, list) and 1 <= len(raw_name) <= 8
                and all(isinstance(s, str) and s for s in raw_name)):
            raise _Refuse(place, "datatype name must be a list of 1 to 8 non-empty strings")
        name = normalise(raw_name)
        if name[:2] == ("Core", "Ptr"):
            raise _Refuse(place, "raw pointer type (Core.Ptr): forged pointers are never allowed")
        if name not in TYPE_NAMES:
            raise _Refuse(place, f"type {_dotted(name)} is not on the allowlist")
        with self.nested(place):
            params = self.type_params(raw_params, name, place, trail)
        result = JType(name, params)
        self.type_cache[key] = result
        return result

    def type_params(self, raw, name: tuple[str, ...], place: str, trail: tuple[int, ...]) -> tuple:
        raw = self.deref(raw)
        if _tag(raw) == "array":       # all-isbits params, e.g. MaxPool{2,4}, are an Int64 array
            values = self.int_array(raw, f"{place} (type parameters)")
            return tuple(values)
        if not isinstance(raw, list):
            raise self.refuse_value(raw, f"{place} (type parameters)", "a list of type parameters")
        params = []
        base = place.split(" (type parameter ")[0]
        for i, item in enumerate(raw):
            where = f"{base} (type parameter {'.'.join(map(str, trail + (i + 1,)))})"
            item = self.deref(item)
            if isinstance(item, bool):      # no allowlisted type takes one, and True == 1 in Python
                raise _Refuse(where, f"boolean type parameter {str(item).lower()} is not expected")
            if isinstance(item, int):
                params.append(item)
            elif _tag(item) == "tuple" and name == ("Core", "NamedTuple") and i == 0:
                params.append(self.symbol_tuple(item, where))
            else:
                params.append(self.jtype(item, base, trail + (i + 1,)))
        return tuple(params)

    def symbol_tuple(self, node: dict, place: str) -> tuple[str, ...]:
        if set(node) != TAG_KEYS["tuple"] or not isinstance(node["data"], list):
            raise _Refuse(place, "malformed tuple")
        names = []
        for item in node["data"]:
            item = self.deref(item)
            if _tag(item) != "symbol" or set(item) != TAG_KEYS["symbol"] or not isinstance(item["name"], str):
                raise self.refuse_value(item, place, "a symbol (NamedTuple field name)")
            names.append(item["name"])
        return tuple(names)

    # ---- values

    def int_array(self, node: dict, place: str) -> list[int]:
        if set(node) != TAG_KEYS["array"]:
            raise _Refuse(place, "malformed array document")
        elt = self.jtype(node["type"], place)
        if elt.name not in INT_TYPES or elt.params:
            raise _Refuse(place, f"integer array of element type {elt}, expected Core.Int64 or Core.Int32")
        size, data = node["size"], node["data"]
        if not (isinstance(size, list) and len(size) == 1 and isinstance(size[0], int)
                and not isinstance(size[0], bool) and 0 <= size[0] <= 64):
            raise _Refuse(place, "integer array must be 1-dimensional with at most 64 elements")
        dtype = INT_TYPES[elt.name]
        if not isinstance(data, memoryview) or len(data) != size[0] * dtype.itemsize:
            raise _Refuse(place, f"integer array of {size[0]} elements needs {size[0] * dtype.itemsize} bytes of data")
        return [int(v) for v in np.frombuffer(data, dtype)]

    def float_array(self, node, place: str, rank: int | None = None) -> np.ndarray:
        node = self.deref(node)
        if _tag(node) != "array":
            raise self.refuse_value(node, place, "a float array")
        if set(node) != TAG_KEYS["array"]:
            raise _Refuse(place, f"array document with keys {sorted(node)}, expected {sorted(TAG_KEYS['array'])}")
        size, data = node["size"], node["data"]
        if not (isinstance(size, list) and 1 <= len(size) <= MAX_RANK
                and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in size)):
            raise _Refuse(place, f"array size must be a list of 1 to {MAX_RANK} non-negative integers")
        count = math.prod(size)
        elt = self.jtype(node["type"], f"{place} (element type)")
        if elt.name not in FLOAT_TYPES or elt.params:
            zero = " (a zero-size element type: BSON.jl would call its constructor and fill " \
                   f"{count} elements)" if elt.name == ("Core", "Nothing") else ""
            raise _Refuse(place, f"array element type {elt} is not allowed{zero}; expected Float32, Float64 or Float16")
        dtype = FLOAT_TYPES[elt.name]
        dims = "×".join(str(d) for d in size)
        if count > MAX_ARRAY_ELEMENTS:
            raise _Refuse(place, f"array of size {dims} has more than {MAX_ARRAY_ELEMENTS} elements")
        if not isinstance(data, memoryview):
            raise _Refuse(place, "array data must be raw bytes for a float element type")
        if len(data) != count * dtype.itemsize:
            raise _Refuse(place, f"array of size {dims} {_dotted(elt.name)} needs "
                                 f"{count * dtype.itemsize} bytes, data has {len(data)}")
        if rank is not None and len(size) != rank:
            raise _Refuse(place, f"array of rank {len(size)} ({dims}), expected rank {rank}")
        return np.frombuffer(data, dtype, count).reshape(tuple(reversed(size)))

    def struct(self, node, place: str, expected: str) -> tuple[JType, list]:
        node = self.deref(node)
        if _tag(node) != "struct":
            raise self.refuse_value(node, place, expected)
        if set(node) != TAG_KEYS["struct"]:
            raise _Refuse(place, f"struct document with keys {sorted(node)}, expected {sorted(TAG_KEYS['struct'])}")
        try:
            typ = self.jtype(node["type"], place)
        except _Refuse as err:     # name the worst thing inside (a pointer field, a closure) if any
            found = self.danger(node["data"], f"{place}.data")
            if found is None:
                raise
            raise _Refuse(found.place, found.message) from err
        data = node["data"]
        if not isinstance(data, list):
            found = self.danger(node, place)
            if found is not None:
                raise _Refuse(found.place, found.message)
            raise _Refuse(place, f"{typ} with raw bytes: only Float32/Float64 scalars may be primitive values here")
        return typ, data

    def singleton(self, node, place: str, allowed, expected: str) -> tuple[str, ...]:
        """A struct with no fields whose type (no params) is in `allowed`: returns the type name."""
        target = self.deref(node)
        if _tag(target) == "struct" and _tag(self.deref(target.get("type"))) == "jl_anonymous":
            raise _Refuse(place, CLOSURE)
        try:
            typ, data = self.struct(target, place, expected)
        except _Refuse as err:
            if err.reason.message.startswith("type ") and "allowlist" in err.reason.message:
                name = _type_name(self.peek(target["type"])) or ("?",)
                what = "function" if name[-1].startswith("#") else "type"
                raise _Refuse(place, f"{what} {_dotted(name)} is not allowed; expected {expected}") from None
            raise
        if typ.name not in allowed:
            what = "function" if typ.name[-1].startswith("#") else "value of type"
            raise _Refuse(place, f"holds the {what} {_dotted(typ.name)}; expected {expected}")
        if data or typ.params:
            raise self.refuse_value(target, place, f"{expected} (a singleton, without fields or type parameters)")
        return typ.name

    def activation(self, node, place: str) -> tuple[str, JType]:
        name = self.singleton(node, place, ACTIVATIONS, "an allowed activation ("
                              + ", ".join(sorted({_act_name(a) for a in ACTIVATIONS.values()})) + ")")
        return ACTIVATIONS[name], JType(name)

    def scalar_float(self, node, place: str) -> tuple[float, JType]:
        node = self.deref(node)
        value = None
        if isinstance(node, float):
            value, typ = node, JType(("Core", "Float64"))
        elif _tag(node) == "struct" and set(node) == TAG_KEYS["struct"] and isinstance(node["data"], memoryview):
            typ = self.jtype(node["type"], place)
            if typ.name in FLOAT_TYPES and not typ.params:
                dtype = FLOAT_TYPES[typ.name]
                if len(node["data"]) != dtype.itemsize:
                    raise _Refuse(place, f"{typ} scalar of {len(node['data'])} bytes, expected {dtype.itemsize}")
                value = float(np.frombuffer(node["data"], dtype)[0])
        if value is None:
            raise self.refuse_value(node, place, "a floating-point number")
        if not math.isfinite(value):
            raise _Refuse(place, f"non-finite {typ} scalar")
        return value, typ

    def integer(self, node, place: str) -> int:
        node = self.deref(node)
        if isinstance(node, int) and not isinstance(node, bool):
            return node
        raise self.refuse_value(node, place, "an integer")

    def boolean(self, node, place: str) -> bool:
        node = self.deref(node)
        if isinstance(node, bool):
            return node
        raise self.refuse_value(node, place, "true or false")

    def int_tuple(self, node, place: str, lengths: tuple[int, ...], minimum: int) -> tuple[int, ...]:
        node = self.deref(node)
        if _tag(node) != "tuple" or set(node) != TAG_KEYS["tuple"] or not isinstance(node["data"], list):
            raise self.refuse_value(node, place, "a tuple of integers")
        values = tuple(self.integer(v, f"{place}[{i + 1}]") for i, v in enumerate(node["data"]))
        if len(values) not in lengths:
            raise _Refuse(place, f"tuple of {len(values)} integers, expected {' or '.join(map(str, lengths))}")
        if any(v < minimum or v > 1 << 20 for v in values):
            raise _Refuse(place, f"tuple {_jl_tuple(values)} has values outside {minimum}..{1 << 20}")
        return values

    def bias(self, node, place: str, length: int) -> tuple[np.ndarray | None, list[JType]]:
        """A bias vector, or `false` (0.13+) / Flux.Zeros (0.11, 0.12) for none; with the type(s) it may have."""
        node = self.deref(node)
        if node is False:
            self.written_by(place, "bias false")
            return None, [JType(("Core", "Bool"))]
        if _tag(node) == "struct":
            typ, data = self.struct(node, place, "a bias")
            if typ.name == ("Flux", "Zeros"):
                if data:   # 0.11: Zeros{T,N}(size)
                    size = self.int_tuple(data[0], f"{place}.size", (1,), 0)
                    if len(data) != 1 or size != (length,):
                        raise _Refuse(place, f"Flux.Zeros of size {size}, expected ({length},)")
                self.written_by(place, "bias Flux.Zeros with a size" if data else "bias Flux.Zeros()")
                return None, [typ]
            raise self.refuse_value(node, place, "a bias vector, false or Flux.Zeros")
        bias = self.float_array(node, place, rank=1)
        if bias.shape[0] != length:
            raise _Refuse(place, f"bias of length {bias.shape[0]}, expected {length}")
        return bias, [_array_type(bias.dtype, 1)]

    def layer_struct(self, node, place: str) -> tuple[JType, list]:
        """Like struct(), but a bad type of a known layer is reported after its data is checked.

        The data names the problem better (`model.σ: function Base.#run ...` rather than the
        same function as a type parameter); expect_param raises the type's error later.
        """
        if _tag(node) == "struct" and set(node) == TAG_KEYS["struct"] and isinstance(node["data"], list):
            raw = self.peek(node["type"])
            name = _type_name(raw) or ()
            if len(name) == 2 and name[0] == "Flux" and name[1] in LAYER_TYPES and set(raw) == TAG_KEYS["datatype"]:
                try:
                    return self.jtype(node["type"], place), node["data"]
                except _Refuse as err:
                    params = self.peek(raw["params"])
                    count = len(params) if isinstance(params, list) else (
                        params["size"][0] if _tag(params) == "array" and isinstance(params.get("size"), list)
                        and params["size"] and isinstance(params["size"][0], int) else 0)
                    self.type_errors[place] = err
                    return JType(name, (_UNPARSED,) * min(count, 16)), node["data"]
        return self.struct(node, place, "a Flux layer")

    def expect_param(self, place: str, index: int, got, allowed: list, what: str) -> None:
        if got is _UNPARSED:
            raise self.type_errors[place]
        if got not in allowed:
            want = " or ".join(_param_str(a) for a in allowed)
            raise _Refuse(place, f"type parameter {index} ({what}) is {_param_str(got)} but the data says {want}")

    # ---- layers

    def layer(self, node, place: str) -> tuple[Layer, JType]:
        target = self.deref(node)
        if _tag(target) == "struct" and isinstance(target.get("data"), list) and not target["data"]:
            typ_node = self.deref(target.get("type"))
            if _tag(typ_node) == "jl_anonymous":
                raise _Refuse(place, CLOSURE)
            if _type_name(typ_node):
                name = _type_name(typ_node)
                if name in ACTIVATIONS and name not in LAYER_FUNCTIONS:
                    raise _Refuse(place, f"the activation {_dotted(name)} as a whole layer: Julia refuses "
                                         "activations on arrays (it needs broadcasting)")
                if name[-1].startswith("#"):
                    found = self.singleton(target, place, LAYER_FUNCTIONS,
                                           "a layer or one of softmax, flatten, identity")
                    return Function(LAYER_FUNCTIONS[found]), JType(found)
        if (_tag(target) == "struct" and set(target) == TAG_KEYS["struct"] and isinstance(target["data"], list)
                and _tag(self.peek(target["type"])) == "datatype"
                and self.peek(target["type"]).get("name") == ["Flux", "Chain"]):
            # a Chain's layers first: a bad layer is better named at the layer than in the type
            with self.nested(place):
                return self.layer_chain(target["type"], target["data"], place)
        typ, data = self.layer_struct(target, place)
        if typ.name[0] != "Flux" or typ.name[-1] not in LAYER_TYPES or len(typ.name) != 2:
            supported = ", ".join(LAYER_TYPES)
            if typ.name[0] == "Flux":
                raise _Refuse(place, f"layer type {_dotted(typ.name)} is not supported (supported: {supported})")
            raise _Refuse(place, f"holds a value of type {_dotted(typ.name)}; expected a Flux layer ({supported})")
        check = getattr(self, "layer_" + typ.name[-1].lower())
        with self.nested(place):
            layer = check(typ, data, place)
        if place in self.type_errors:     # a layer whose type did not parse is never accepted
            raise self.type_errors[place]
        return layer, typ

    def layer_chain(self, type_node, data: list, place: str) -> tuple[Chain, JType]:
        if len(data) != 1:
            raise _Refuse(place, f"Chain with {len(data)} fields, expected 1 (layers)")
        raw = self.deref(data[0])
        names = None
        if isinstance(raw, list):                       # Chain of a Vector (0.13+)
            items, kind = raw, "vector"
        elif _tag(raw) == "tuple" and set(raw) == TAG_KEYS["tuple"] and isinstance(raw["data"], list):
            items, kind = raw["data"], "tuple"
        elif _tag(raw) == "struct":                     # NamedTuple (0.13+)
            nt, items = self.struct(raw, f"{place}.layers", "the Chain's layers")
            if nt.name != ("Core", "NamedTuple") or len(nt.params) != 2 or not isinstance(nt.params[0], tuple):
                raise _Refuse(f"{place}.layers", f"holds a value of type {nt}; expected a tuple, vector or NamedTuple of layers")
            names, kind = nt.params[0], "named"
            if len(names) != len(items) or len(set(names)) != len(names):
                raise _Refuse(f"{place}.layers", f"NamedTuple with {len(names)} names for {len(items)} layers")
        else:
            raise self.refuse_value(raw, f"{place}.layers", "a tuple, vector or NamedTuple of layers")
        if not items:
            raise _Refuse(place, "empty Chain")
        layers, types, failed = [], [], False
        for i, item in enumerate(items):
            where = f"{place}.layers.{names[i]}" if names else f"{place}.layers[{i + 1}]"
            try:
                layer, ltype = self.layer(item, where)
            except _Refuse as err:
                self.refuse(err.reason)
                failed = True
                continue
            except _Recorded:
                failed = True
                continue
            layers.append(layer)
            types.append(ltype)
        if failed:
            raise _Recorded()
        typ = self.jtype(type_node, place)
        if len(typ.params) != 1:
            raise _Refuse(place, f"Chain with {len(typ.params)} type parameters, expected 1")
        tuple_type = JType(("Core", "Tuple"), tuple(types))
        if kind == "vector":
            param = typ.params[0]
            if not (isinstance(param, JType) and param.name == ("Core", "Array") and len(param.params) == 2
                    and param.params[1] == 1 and (param.params[0] == JType(("Core", "Any"))
                                                  or all(t == param.params[0] for t in types))):
                raise _Refuse(place, f"type parameter 1 is {_param_str(param)} but the layers are a vector of {tuple_type}")
        elif kind == "named":
            self.expect_param(place, 1, typ.params[0], [JType(("Core", "NamedTuple"), (names, tuple_type))], "layers")
            nt_type = self.jtype(self.deref(data[0])["type"], place)
            if nt_type.params[1] != tuple_type:
                raise _Refuse(f"{place}.layers", f"NamedTuple type says {nt_type.params[1]} but the layers are {tuple_type}")
        else:
            self.expect_param(place, 1, typ.params[0], [tuple_type], "layers")
        return Chain(tuple(layers), names), typ

    def layer_dense(self, typ: JType, data: list, place: str) -> Dense:
        if len(typ.params) != 3 or len(data) != 3:
            raise _Refuse(place, f"Dense with {len(data)} fields and {len(typ.params)} type parameters, "
                                 "expected 3 fields [weight, bias, σ] and 3 type parameters")
        weight = self.float_array(data[0], f"{place}.weight", rank=2)    # numpy (in, out)
        bias, bias_types = self.bias(data[1], f"{place}.bias", weight.shape[1])
        if bias is not None and bias.dtype != weight.dtype:
            raise _Refuse(f"{place}.bias", f"element type {bias.dtype} differs from the weight's {weight.dtype}")
        act, act_type = self.activation(data[2], f"{place}.σ")
        self.expect_param(place, 1, typ.params[0], [act_type], "σ")
        self.expect_param(place, 2, typ.params[1], [_array_type(weight.dtype, 2)], "weight")
        self.expect_param(place, 3, typ.params[2], bias_types, "bias")
        return Dense(weight, bias, act)

    def layer_conv(self, typ: JType, data: list, place: str) -> Conv:
        if not ((len(typ.params) == 4 and len(data) == 6) or (len(typ.params) == 5 and len(data) in (6, 7))):
            raise _Refuse(place, f"Conv with {len(data)} fields and {len(typ.params)} type parameters, expected "
                                 "[σ, weight, bias, stride, pad, dilation(, groups)] with Conv{N,(M,)F,A,V}")
        self.written_by(place, "Conv{N,F,A,V} with 6 fields" if len(typ.params) == 4 else
                        f"Conv{{N,M,F,A,V}} with {len(data)} fields ({'groups' if len(data) == 7 else 'no groups'})")
        act, act_type = self.activation(data[0], f"{place}.σ")
        weight = self.float_array(data[1], f"{place}.weight")
        n = weight.ndim - 2
        if not 1 <= n <= 3:
            raise _Refuse(f"{place}.weight", f"rank {weight.ndim}: only 1-, 2- and 3-d convolutions are supported")
        groups = self.integer(data[6], f"{place}.groups") if len(data) == 7 else 1
        cout = weight.shape[0]
        if groups < 1 or cout % groups:
            raise _Refuse(f"{place}.groups", f"groups={groups} does not divide the {cout} output channels")
        bias, bias_types = self.bias(data[2], f"{place}.bias", cout)
        if bias is not None and bias.dtype != weight.dtype:
            raise _Refuse(f"{place}.bias", f"element type {bias.dtype} differs from the weight's {weight.dtype}")
        stride = self.int_tuple(data[3], f"{place}.stride", (n,), 1)
        pad_lengths = (n,) if len(typ.params) == 4 else (n, 2 * n)
        pad = self.int_tuple(data[4], f"{place}.pad", pad_lengths, 0)
        dilation = self.int_tuple(data[5], f"{place}.dilation", (n,), 1)
        params = typ.params
        self.expect_param(place, 1, params[0], [n], "N, spatial dimensions")
        if len(params) == 5:
            self.expect_param(place, 2, params[1], [len(pad)], "M, pad length")
        offset = len(params) - 3
        self.expect_param(place, offset + 1, params[offset], [act_type], "σ")
        self.expect_param(place, offset + 2, params[offset + 1], [_array_type(weight.dtype, n + 2)], "weight")
        self.expect_param(place, offset + 3, params[offset + 2], bias_types, "bias")
        return Conv(weight, bias, act, tuple(reversed(stride)), _numpy_pad(pad, n), tuple(reversed(dilation)), groups)

    def layer_maxpool(self, typ: JType, data: list, place: str) -> Pool:
        return self._pool("max", typ, data, place)

    def layer_meanpool(self, typ: JType, data: list, place: str) -> Pool:
        return self._pool("mean", typ, data, place)

    def _pool(self, mode: str, typ: JType, data: list, place: str) -> Pool:
        if len(typ.params) != 2 or len(data) != 3:
            raise _Refuse(place, f"pooling layer with {len(data)} fields and {len(typ.params)} type parameters, "
                                 "expected [k, pad, stride] with {N,M}")
        window = self.int_tuple(data[0], f"{place}.k", (1, 2, 3), 1)
        n = len(window)
        pad = self.int_tuple(data[1], f"{place}.pad", (n, 2 * n), 0)
        stride = self.int_tuple(data[2], f"{place}.stride", (n,), 1)
        self.expect_param(place, 1, typ.params[0], [n], "N, window dimensions")
        self.expect_param(place, 2, typ.params[1], [len(pad)], "M, pad length")
        return Pool(mode, tuple(reversed(window)), _numpy_pad(pad, n), tuple(reversed(stride)))

    def layer_batchnorm(self, typ: JType, data: list, place: str) -> BatchNorm:
        if len(typ.params) != 4 or len(data) not in (8, 11):
            raise _Refuse(place, f"BatchNorm with {len(data)} fields and {len(typ.params)} type parameters, "
                                 "expected 8 (Flux 0.10-0.11) or 11 (0.12+) fields and 4 type parameters")
        self.written_by(place, f"BatchNorm with {len(data)} fields")
        act, act_type = self.activation(data[0], f"{place}.λ")
        modern = len(data) == 11
        affine = self.boolean(data[7], f"{place}.affine") if modern else True
        if modern and not self.boolean(data[8], f"{place}.track_stats"):
            raise _Refuse(f"{place}.track_stats", "false: Flux would normalise with batch statistics, not stored ones")
        active = self.deref(data[9] if modern else data[7])
        if active is True:
            raise _Refuse(f"{place}.active", "true: saved in training mode, Flux would use batch statistics")
        if active is not None and active is not False:   # identity: 0 == False in Python
            raise self.refuse_value(active, f"{place}.active", "nothing or false")
        mean = self.float_array(data[3], f"{place}.μ", rank=1)
        var = self.float_array(data[4], f"{place}.σ²", rank=1)
        chs = mean.shape[0]
        if modern and self.integer(data[10], f"{place}.chs") != chs:
            raise _Refuse(f"{place}.chs", f"says {self.deref(data[10])} channels but μ has {chs}")
        if affine:
            beta = self.float_array(data[1], f"{place}.β", rank=1)
            gamma = self.float_array(data[2], f"{place}.γ", rank=1)
        else:
            for i, field in ((1, "β"), (2, "γ")):
                if self.deref(data[i]) is not None:
                    raise self.refuse_value(data[i], f"{place}.{field}", "nothing (affine=false)")
            beta = gamma = None
        for field, arr in (("β", beta), ("γ", gamma), ("σ²", var)):
            if arr is not None and arr.shape[0] != chs:
                raise _Refuse(f"{place}.{field}", f"length {arr.shape[0]}, expected {chs} channels like μ")
        if var.dtype != mean.dtype:
            raise _Refuse(f"{place}.σ²", f"element type {var.dtype} differs from μ's {mean.dtype}")
        stats_vector = _array_type(mean.dtype, 1)
        if affine and gamma.dtype != beta.dtype:
            raise _Refuse(f"{place}.γ", f"element type {gamma.dtype} differs from β's {beta.dtype}")
        if affine and beta.dtype != mean.dtype:
            # Flux 0.10.0-0.11.6 write the running statistics as Float64 beside Float32 β/γ
            # (BatchNorm(chs) does `zeros(chs), ones(chs)`: src/layers/normalise.jl of those releases).
            # Accepted in that layout only, and evaluated in the parameters' type: μ, σ² are converted to it here.
            if modern or mean.dtype != np.float64:
                raise _Refuse(f"{place}.μ", f"element type {mean.dtype} differs from β's {beta.dtype} (only "
                                            "Flux 0.10-0.11 mix types here: Float64 μ, σ² with Float32 β, γ)")
            if np.any(np.abs(var) > np.finfo(beta.dtype).max) or np.any(np.abs(mean) > np.finfo(beta.dtype).max):
                raise _Refuse(f"{place}.σ²", f"running statistics beyond the range of {beta.dtype}, "
                                             "the parameters' type they are evaluated in")
            mean, var = mean.astype(beta.dtype), var.astype(beta.dtype)
        if np.any(var < 0):
            raise _Refuse(f"{place}.σ²", "negative variance")
        eps, eps_type = self.scalar_float(data[5], f"{place}.ϵ")
        _, mom_type = self.scalar_float(data[6], f"{place}.momentum")
        if eps <= 0:
            raise _Refuse(f"{place}.ϵ", f"ϵ={eps} must be positive")
        params = typ.params
        self.expect_param(place, 1, params[0], [act_type], "λ")
        # 0.10-0.11 BatchNorm{F,V,W,N}; 0.12+ BatchNorm{F,V,N,W}: V types β/γ, W μ/σ², N ϵ/momentum
        v_index, n_index, w_index = (2, 3, 4) if modern else (2, 4, 3)
        self.expect_param(place, v_index, params[v_index - 1],
                          [_array_type(beta.dtype, 1) if affine else JType(("Core", "Nothing"))], "β, γ")
        self.expect_param(place, n_index, params[n_index - 1], [eps_type], "ϵ")
        self.expect_param(place, w_index, params[w_index - 1], [stats_vector], "μ, σ²")
        if mom_type != eps_type:
            raise _Refuse(f"{place}.momentum", f"of type {mom_type}, but ϵ is {eps_type}")
        return BatchNorm(act, beta, gamma, mean, var, eps)

    def layer_dropout(self, typ: JType, data: list, place: str) -> Dropout:
        layouts = {(1, 2), (1, 3), (2, 3), (3, 4)}     # (type params, fields) for 0.8 / 0.9 / 0.10-0.12 / 0.13+
        if (len(typ.params), len(data)) not in layouts:
            raise _Refuse(place, f"Dropout with {len(data)} fields and {len(typ.params)} type parameters, "
                                 "expected [p, (dims,) active(, rng)]")
        self.written_by(place, {(1, 2): "Dropout{F} with 2 fields", (1, 3): "Dropout{F} with 3 fields",
                                (2, 3): "Dropout{F,D} with 3 fields",
                                (3, 4): "Dropout{F,D,R} with 4 fields"}[(len(typ.params), len(data))])
        p, p_type = self.scalar_float(data[0], f"{place}.p")
        if not 0 <= p < 1:
            raise _Refuse(f"{place}.p", f"p={p} outside [0, 1)")
        active = self.deref(data[1] if len(data) == 2 else data[2])
        if active is True:
            raise _Refuse(f"{place}.active", "true: saved in training mode, Flux would drop values at random")
        if active is not None and active is not False:   # identity: 0 == False in Python
            raise self.refuse_value(active, f"{place}.active", "nothing or false")
        self.expect_param(place, 1, typ.params[0], [p_type], "p")
        if len(data) >= 3:
            dims = self.deref(data[1])
            if isinstance(dims, int) and not isinstance(dims, bool):
                dims_types = [JType(("Core", "Int64")), JType(("Core", "Int32"))]
            elif _tag(dims) == "tuple":
                n = len(self.int_tuple(dims, f"{place}.dims", tuple(range(1, MAX_RANK + 1)), 1))
                dims_types = [JType(("Core", "Tuple"), (JType(("Core", t)),) * n) for t in ("Int64", "Int32")]
            else:
                self.singleton(dims, f"{place}.dims", {("Base", "Colon")}, "a dimension, a tuple of them or :")
                dims_types = [JType(("Base", "Colon"))]
            if len(typ.params) >= 2:
                self.expect_param(place, 2, typ.params[1], dims_types, "dims")
        if len(data) == 4:
            rng = self.singleton(data[3], f"{place}.rng", RNG_SINGLETONS, "Random.TaskLocalRNG()")
            self.expect_param(place, 3, typ.params[2], [JType(rng)], "rng")
        return Dropout(p)

    # ---- inert data (non-model top-level values, unused _backrefs entries)

    def inert(self, node, place: str) -> None:
        """Refuse anything but plain data and allowlisted types; backrefs are left to their entries."""
        stack = [(node, place)]
        while stack:
            item, where = stack.pop()
            if item is None or isinstance(item, (bool, int, float, str, memoryview)):
                continue
            if isinstance(item, list):
                stack.extend((v, f"{where}[{i + 1}]") for i, v in enumerate(item))
                continue
            tag = _tag(item)
            if tag == "backref":
                continue
            try:
                if tag == "tuple" and set(item) == TAG_KEYS["tuple"] and isinstance(item["data"], list):
                    stack.extend((v, f"{where}[{i + 1}]") for i, v in enumerate(item["data"]))
                elif tag == "symbol" and set(item) == TAG_KEYS["symbol"] and isinstance(item["name"], str):
                    pass
                elif tag == "datatype":
                    self.jtype(item, where)
                elif tag == "array":
                    self.float_array(item, where)
                elif tag == "struct" and isinstance(item.get("data"), memoryview):
                    self.scalar_float(item, where)
                else:
                    raise self.refuse_value(item, where, "plain data (numbers, strings, float arrays)")
            except _Refuse as err:
                self.refuse(self.danger(item, where) or err.reason)


def _path_text(path) -> str:
    if isinstance(path, list) and all(isinstance(p, str) for p in path):
        return ".".join(path)
    return "?"


def _numpy_pad(pad: tuple[int, ...], n: int) -> tuple[tuple[int, int], ...]:
    """Julia pad (lo1, hi1, lo2, hi2, ...) or symmetric (p1, p2, ...) -> numpy-ordered (lo, hi) pairs."""
    pairs = [(p, p) for p in pad] if len(pad) == n else [(pad[2 * i], pad[2 * i + 1]) for i in range(n)]
    return tuple(reversed(pairs))

# ---------------------------------------------------------------- entry points

def scan_bytes(data: bytes | memoryview, file: str = "model.bson") -> Verdict:
    """Scan the bytes of a BSON.jl file; never raises for bad content, returns the verdict."""
    try:
        top = bson.parse(data)
    except bson.BsonError as err:
        return Verdict(file, REFUSED, (Reason(file, str(err)),))
    scan = _Scan(top)
    if "tag" in top:
        return Verdict(file, REFUSED, (Reason("top", "key 'tag' at the top level would make BSON.jl read "
                                              "the whole file as one tagged value"),))
    try:
        cycles = scan.check_backrefs()
    except _Refuse as err:
        return Verdict(file, REFUSED, (err.reason,))

    keys = [k for k in top if k != "_backrefs"]
    candidates = []
    for key in keys:
        target = scan.peek(top[key])
        typ = scan.peek(target.get("type")) if _tag(target) == "struct" else None
        if (_type_name(typ) or ())[:1] == ("Flux",):
            candidates.append(key)
        else:
            scan.inert(top[key], key)
    model = None
    if len(candidates) > 1:
        scan.refuse(Reason("top", f"{len(candidates)} Flux models ({', '.join(candidates)}): "
                                  "cannot tell which one to serve"))
    elif candidates:
        key = candidates[0]
        try:
            root, _ = scan.layer(top[key], key)
            scan.check_conv_eras()
            model = _finish(key, root)
        except _Refuse as err:
            scan.refuse(err.reason)
        except _Recorded:
            pass
        except ShapeError as err:
            scan.refuse(Reason(err.place, err.message))
    # _backrefs entries the model does not use must still be inert
    for index, entry in enumerate(scan.refs):
        if index not in scan.used_entries:
            scan.inert(entry, f"_backrefs[{index + 1}]")
    for reason in cycles:
        scan.refuse(reason)

    if not candidates:
        reasons = [Reason("top", "no Flux model at the top level (keys: " + (", ".join(keys) or "none")
                          + "): weights or other data only")] + scan.reasons
        return Verdict(file, REFUSED if scan.reasons else NOT_A_MODEL, tuple(reasons[:MAX_REASONS]))
    if scan.reasons:
        return Verdict(file, REFUSED, tuple(scan.reasons))
    return Verdict(file, ACCEPTED, (), model)


def _arrays(layer: Layer) -> list[np.ndarray]:
    return [v for v in (getattr(layer, f.name) for f in dataclasses.fields(layer)) if isinstance(v, np.ndarray)]


def _finish(key: str, root: Layer) -> Model:
    layers = leaves(root, key)
    shape_in = input_shape(layers, key)
    dtypes = {arr.dtype for _, layer in layers for arr in _arrays(layer)}
    if len(dtypes) != 1:
        found = ", ".join(sorted(str(d) for d in dtypes)) or "none"
        raise _Refuse(key, f"weights must share one element type, found {found}")
    for place, layer in layers:
        if any(isinstance(arr, np.ndarray) and arr.size == 0 for arr in _arrays(layer)):
            raise _Refuse(place, f"{layer.summary} has an empty weight array")
    dtype = next(iter(dtypes))
    shape = shape_in
    for place, layer in layers:
        shape = layer_shape(layer, shape, place)
    spec = lambda s: tuple(-1 if d is None else d for d in s)  # noqa: E731
    return Model(key, root, dtype, DATATYPE_NAMES[dtype], spec(shape_in), spec(shape), tuple(layers))


def read_file(path: str | os.PathLike) -> bytes:
    """The file's bytes; OSError if unreadable, bson.BsonError if above MAX_FILE_BYTES (checked before reading)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > bson.MAX_FILE_BYTES:
            raise bson.BsonError(f"bson: file is {size} bytes, above the limit of {bson.MAX_FILE_BYTES}")
        data = f.read(bson.MAX_FILE_BYTES + 1)     # st_size can lie for special files
    if len(data) > bson.MAX_FILE_BYTES:
        raise bson.BsonError(f"bson: file is more than {bson.MAX_FILE_BYTES} bytes")
    return data


def scan_file(path: str | os.PathLike, name: str | None = None) -> Verdict:
    """Scan a file; raise OSError if it cannot be read."""
    label = name or os.fspath(path)
    try:
        data = read_file(path)
    except bson.BsonError as err:
        return Verdict(label, REFUSED, (Reason(label, str(err)),))
    return scan_bytes(data, label)
