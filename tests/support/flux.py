"""Write BSON.jl-format files for tests: a plain BSON encoder and Flux layer builders.

The builders mirror the structure of real files in the corpus (e.g.
sebkaz+Julia_Deploy/02_Docker_app_nn_model.bson, banachtech+replicator/model.bson,
DhairyaLGandhi+JuliaCon2020_dash/model_conv.bson): types of mutable values
(Array{T,N}, BatchNorm{...}, Dropout{...}) live in `_backrefs` and are referred to
by backref, arrays are inline with column-major bytes, MaxPool's all-Int
type parameters are an Int64 "array" document, Base is spelled Main.Base and
Core is Main.Core (Julia <= 1.3, Flux 0.10 era) or Core (later).

Arrays are given in Julia shape: a numpy array `a` of shape (d1, ..., dn)
stands for the Julia array of size (d1, ..., dn); its bytes are written in
column-major order like BSON.jl does.
"""
from __future__ import annotations

import struct

import numpy as np


class I32(int):
    """An int written as BSON int32 (BSON.jl writes Int64 as int64)."""


class Pairs(list):
    """A document given as (key, value) pairs, to write duplicate keys."""


def encode_value(value) -> tuple[int, bytes]:
    if value is None:
        return 0x0A, b""
    if isinstance(value, bool):
        return 0x08, bytes([value])
    if isinstance(value, I32):
        return 0x10, struct.pack("<i", value)
    if isinstance(value, int):
        return 0x12, struct.pack("<q", value)
    if isinstance(value, float):
        return 0x01, struct.pack("<d", value)
    if isinstance(value, str):
        raw = value.encode()
        return 0x02, struct.pack("<i", len(raw) + 1) + raw + b"\x00"
    if isinstance(value, (bytes, bytearray)):
        return 0x05, struct.pack("<i", len(value)) + b"\x00" + bytes(value)
    if isinstance(value, (dict, Pairs)):
        return 0x03, encode(value)
    if isinstance(value, list):
        return 0x04, encode(Pairs((str(i), v) for i, v in enumerate(value)))
    raise TypeError(f"cannot encode {type(value)}")


def encode(doc) -> bytes:
    """A BSON document from a dict or Pairs."""
    items = doc.items() if isinstance(doc, dict) else doc
    parts = []
    for key, value in items:
        etype, payload = encode_value(value)
        parts += [bytes([etype]), key.encode(), b"\x00", payload]
    body = b"".join(parts)
    return struct.pack("<i", len(body) + 5) + body + b"\x00"


# ---------------------------------------------------------------- Julia-level documents

def datatype(name: list[str], params=()) -> dict:
    return {"tag": "datatype", "name": list(name), "params": list(params) if not isinstance(params, dict) else params}


def struct_(typ, data) -> dict:
    return {"tag": "struct", "type": typ, "data": data}


def tuple_(*items) -> dict:
    return {"tag": "tuple", "data": list(items)}


def symbol(name: str) -> dict:
    return {"tag": "symbol", "name": name}


def backref(index: int) -> dict:
    return {"tag": "backref", "ref": index}


ELTYPES = {np.dtype("float32"): "Float32", np.dtype("float64"): "Float64", np.dtype("float16"): "Float16"}


class Era:
    """Builders for one Flux/Julia era: "0.10" (Julia 1.3), "0.12" (Flux.Zeros) or "0.13" (0.13-0.16)."""

    def __init__(self, era: str):
        assert era in ("0.10", "0.12", "0.13")
        self.era = era
        self.core = ["Main", "Core"] if era == "0.10" else ["Core"]
        self.backrefs: list = []
        self._index: dict[str, int] = {}

    # ---- types

    def core_type(self, name: str, params=()) -> dict:
        return datatype(self.core + [name], params)

    def mutable_type(self, doc: dict) -> dict:
        """Types of mutable values are deduplicated by BSON.jl: store once, refer by backref."""
        key = repr(doc)
        if key not in self._index:
            self.backrefs.append(doc)
            self._index[key] = len(self.backrefs)
        return backref(self._index[key])

    def array_type(self, dtype, rank: int) -> dict:
        return self.mutable_type(self.core_type("Array", [self.core_type(ELTYPES[np.dtype(dtype)]), rank]))

    def function(self, name: str) -> tuple[dict, dict]:
        module = {"identity": ["Main", "Base"], "tanh": ["Main", "Base"], "flatten":
                  ["Flux"] if self.era in ("0.10", "0.12") else ["MLUtils"]}.get(name, ["NNlib"])
        typ = datatype(module + ["#" + name])
        return struct_(typ, []), typ

    def array(self, a: np.ndarray) -> dict:
        a = np.asarray(a)
        return {"tag": "array", "type": self.core_type(ELTYPES[a.dtype]), "size": list(a.shape),
                "data": a.tobytes(order="F")}

    def float_scalar(self, value: float, dtype="float32") -> tuple[dict, dict]:
        typ = self.core_type(ELTYPES[np.dtype(dtype)])
        return struct_(typ, np.array(value, dtype).tobytes()), typ

    def int_params(self, *values: int) -> dict:
        return {"tag": "array", "type": self.core_type("Int64"), "size": [len(values)],
                "data": np.array(values, "<i8").tobytes()}

    # ---- layers: each returns (value document, type document)

    def bias(self, b) -> tuple[object, dict]:
        if b is not None:
            b = np.asarray(b)
            return self.array(b), self.array_type(b.dtype, 1)
        if self.era == "0.13":
            return False, self.core_type("Bool")
        zeros = datatype(["Flux", "Zeros"])
        return struct_(zeros, []), zeros

    def dense(self, weight, bias, act: str = "identity"):
        weight = np.asarray(weight)
        fn, fn_type = self.function(act)
        b, b_type = self.bias(bias)
        typ = datatype(["Flux", "Dense"], [fn_type, self.array_type(weight.dtype, 2), b_type])
        return struct_(typ, [self.array(weight), b, fn]), typ

    def conv(self, weight, bias, act="identity", stride=None, pad=None, dilation=None, groups=1):
        weight = np.asarray(weight)
        n = weight.ndim - 2
        stride = stride or (1,) * n
        pad = pad or (0,) * (2 * n)
        dilation = dilation or (1,) * n
        fn, fn_type = self.function(act)
        b, b_type = self.bias(bias)
        typ = datatype(["Flux", "Conv"], [n, len(pad), fn_type, self.array_type(weight.dtype, n + 2), b_type])
        data = [fn, self.array(weight), b, tuple_(*stride), tuple_(*pad), tuple_(*dilation)]
        if self.era != "0.10":
            data.append(groups)
        else:
            assert groups == 1
        return struct_(typ, data), typ

    def pool(self, kind: str, k, pad=None, stride=None):
        n = len(k)
        pad = pad or (0,) * (2 * n)
        stride = stride or tuple(k)
        typ = datatype(["Flux", kind], self.int_params(n, len(pad)))
        return struct_(typ, [tuple_(*k), tuple_(*pad), tuple_(*stride)]), typ

    def batchnorm(self, beta, gamma, mean, var, act="identity", eps=1e-5, momentum=0.1, affine=True):
        mean, var = np.asarray(mean), np.asarray(var)
        fn, fn_type = self.function(act)
        vec = self.array_type(mean.dtype, 1)
        eps_doc, eps_type = self.float_scalar(eps, mean.dtype)
        mom_doc, _ = self.float_scalar(momentum, mean.dtype)
        if self.era == "0.10":
            assert affine
            typ = self.mutable_type(datatype(["Flux", "BatchNorm"], [fn_type, vec, vec, eps_type]))
            data = [fn, self.array(beta), self.array(gamma), self.array(mean), self.array(var),
                    eps_doc, mom_doc, None]
        else:
            v_type = vec if affine else self.core_type("Nothing")
            typ = self.mutable_type(datatype(["Flux", "BatchNorm"], [fn_type, v_type, eps_type, vec]))
            data = [fn, self.array(beta) if affine else None, self.array(gamma) if affine else None,
                    self.array(mean), self.array(var), eps_doc, mom_doc, affine, True, None, int(mean.shape[0])]
        return struct_(typ, data), typ

    def dropout(self, p: float):
        colon = datatype(["Main", "Base", "Colon"])
        f64 = self.core_type("Float64")
        if self.era == "0.13":
            rng = datatype(["Random", "TaskLocalRNG"])
            typ = self.mutable_type(datatype(["Flux", "Dropout"], [f64, colon, rng]))
            return struct_(typ, [p, struct_(colon, []), None, struct_(rng, [])]), typ
        typ = self.mutable_type(datatype(["Flux", "Dropout"], [f64, colon]))
        return struct_(typ, [p, struct_(colon, []), None]), typ

    def chain(self, layers: list[tuple[dict, dict]], form: str = "tuple", names=None):
        values = [v for v, _ in layers]
        types = [t for _, t in layers]
        tuple_type = self.core_type("Tuple", types)
        if form == "tuple":
            container, param = tuple_(*values), tuple_type
        elif form == "vector":
            container, param = values, self.core_type("Array", [self.core_type("Any"), 1])
        else:
            nt_type = self.core_type("NamedTuple", [tuple_(*[symbol(n) for n in names]), tuple_type])
            container, param = struct_(nt_type, values), nt_type
        typ = datatype(["Flux", "Chain"], [param])
        return struct_(typ, [container]), typ

    def file(self, model, key: str = "model", extra: dict | None = None) -> bytes:
        """The bytes of `@save "file.bson" model`: the model, any extra keys, then _backrefs."""
        doc = {key: model[0] if isinstance(model, tuple) else model}
        doc.update(extra or {})
        if self.backrefs:
            doc["_backrefs"] = list(self.backrefs)
        return encode(doc)
