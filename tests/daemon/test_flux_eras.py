"""Flux scanner judgement calls on layouts Flux really writes.

* Flux 0.10.0-0.11.6 save BatchNorm's running statistics μ, σ² as Float64 beside Float32 β, γ
  (`BatchNorm(chs)` does `zeros(chs), ones(chs)`, src/layers/normalise.jl of those releases): accepted
  in that layout, evaluated in the parameters' type (Float32), served with the numbers an independent
  numpy computation written here gives.
* A Conv's field count must fit the Flux releases the rest of the file implies (the table is in
  worker/flux/README.md): a 7-field Conv (groups, Flux 0.12.6+) beside an 8-field BatchNorm (Flux <= 0.11)
  is a layout no Flux version writes, refused by name; so is a 6-field Conv with `bias = false` (0.13+).
"""
from __future__ import annotations

import numpy as np
import pytest

from tests.support.pki import upstream_sign
from tests.support.flux import Era, datatype, struct_

RNG = np.random.default_rng(1011)
W1 = RNG.standard_normal((3, 4)).astype(np.float32)      # Julia size (out, in) = (3, 4)
B1 = RNG.standard_normal(3).astype(np.float32)
BETA = RNG.standard_normal(3).astype(np.float32)
GAMMA = (RNG.random(3) + 0.5).astype(np.float32)
MU = RNG.standard_normal(3).astype(np.float64) * 0.3      # Float64, as Flux 0.11 keeps them
SIGMA2 = (RNG.random(3) + 0.2).astype(np.float64)
W2 = RNG.standard_normal((2, 3)).astype(np.float32)
B2 = RNG.standard_normal(2).astype(np.float32)
EPS = np.float32(1e-5)


def flux011_batchnorm(era: Era, beta, gamma, mean, var, eps=1e-5, momentum=0.1):
    """BatchNorm as Flux 0.10.2-0.11.6 write it: BatchNorm{F,V,W,N} with V = Vector{Float32} (β, γ),
    W = Vector{Float64} (μ, σ²), N = Float32 (ϵ, momentum); 8 fields, active = nothing."""
    fn, fn_type = era.function("identity")
    v = era.array_type(np.float32, 1)
    w = era.array_type(np.float64, 1)
    eps_doc, eps_type = era.float_scalar(eps, "float32")
    mom_doc, _ = era.float_scalar(momentum, "float32")
    typ = era.mutable_type(datatype(["Flux", "BatchNorm"], [fn_type, v, w, eps_type]))
    data = [fn, era.array(beta), era.array(gamma), era.array(mean), era.array(var), eps_doc, mom_doc, None]
    return struct_(typ, data), typ


def flux011_model() -> bytes:
    """Chain(Dense(4, 3), BatchNorm(3), Dense(3, 2, relu)) saved by Flux 0.11 on Julia 1.5 (Core, not Main.Core)."""
    era = Era("0.10")
    era.core = ["Core"]
    model = era.chain([era.dense(W1, B1), flux011_batchnorm(era, BETA, GAMMA, MU, SIGMA2),
                       era.dense(W2, B2, "relu")])
    return era.file(model)


def expected(x: np.ndarray) -> np.ndarray:
    """Independent of the engine: Flux's formulas (Dense: W*x .+ b; BatchNorm in inference mode:
    γ .* (x .- μ) ./ sqrt.(σ² .+ ϵ) .+ β), evaluated in Float32, the parameters' type, on (batch, features)."""
    h = x @ W1.T + B1
    mu, s2 = MU.astype(np.float32), SIGMA2.astype(np.float32)
    h = GAMMA * ((h - mu) / np.sqrt(s2 + EPS)) + BETA
    return np.maximum(h @ W2.T + B2, np.float32(0))


def test_flux011_batchnorm_float64_statistics_are_accepted_by_the_scanner():
    from sealbox.worker.flux.scanner import scan_bytes
    verdict = scan_bytes(flux011_model(), "model.bson")
    assert verdict.status == "accepted", verdict.reasons
    assert verdict.model.datatype == "FP32"


def test_flux011_batchnorm_mix_is_served_with_the_right_numbers(tmp_path, daemon_factory, keys):
    directory = tmp_path / "models" / "bn011"
    directory.mkdir(parents=True)
    (directory / "model.bson").write_bytes(flux011_model())
    upstream_sign(directory, keys[0])
    daemon = daemon_factory({"bn011": {"path": directory, "format": "flux"}}, keys[1]).start()
    x = np.random.default_rng(5).standard_normal((6, 4)).astype(np.float32)
    with daemon.client() as client:
        assert client.status("bn011").state == "READY"
        y = client.infer("bn011", {"input": x})["output"]
    assert y.dtype == np.float32 and y.shape == (6, 2)
    np.testing.assert_allclose(y, expected(x), rtol=1e-5, atol=1e-6)
    assert np.count_nonzero(y) >= 3     # relu left real numbers to compare, not only zeros


@pytest.mark.parametrize("change, place, message", [
    # β Float64 like μ, γ Float32: no Flux release mixes β and γ
    ("gamma32", "model.layers[2].γ", "element type float32 differs from β's float64"),
    # Float32 β/γ with Float64 μ/σ² in the 0.12+ layout (11 fields): 0.12 keeps them Float32
    ("modern", "model.layers[2].μ",
     "element type float64 differs from β's float32 (only Flux 0.10-0.11 mix types here: "
     "Float64 μ, σ² with Float32 β, γ)"),
    # μ Float64, σ² Float32
    ("var32", "model.layers[2].σ²", "element type float32 differs from μ's float64"),
])
def test_other_batchnorm_type_mixes_are_refused(change, place, message):
    from sealbox.worker.flux.scanner import scan_bytes
    era = Era("0.12" if change == "modern" else "0.10")
    era.core = ["Core"]
    if change == "modern":
        bn_value, bn_type = era.batchnorm(BETA, GAMMA, MU.astype(np.float32), SIGMA2.astype(np.float32))
        bn_value["data"][3] = era.array(MU)
        bn_value["data"][4] = era.array(SIGMA2)
    elif change == "gamma32":
        bn_value, bn_type = flux011_batchnorm(era, BETA.astype(np.float64), GAMMA, MU, SIGMA2)
    else:
        bn_value, bn_type = flux011_batchnorm(era, BETA, GAMMA, MU, SIGMA2.astype(np.float32))
    verdict = scan_bytes(era.file(era.chain([era.dense(W1, B1), (bn_value, bn_type)])), "model.bson")
    assert verdict.status == "refused"
    assert (place, message) in [(r.place, r.message) for r in verdict.reasons], verdict.reasons


def conv_chain(era: Era, conv_groups_field: bool, bias="array", with_bn: bool = True) -> bytes:
    weight = RNG.standard_normal((3, 3, 1, 2)).astype(np.float32)     # Julia (k, k, cin, cout)
    b = RNG.standard_normal(2).astype(np.float32) if bias == "array" else None
    conv_value, conv_type = era.conv(weight, b)
    if bias == "false":
        conv_value["data"][2] = False
        conv_type["params"][4] = era.core_type("Bool")
    if conv_groups_field and len(conv_value["data"]) == 6:
        conv_value["data"].append(1)
    if not conv_groups_field and len(conv_value["data"]) == 7:
        conv_value["data"].pop()
    layers = [(conv_value, conv_type)]
    if with_bn:
        layers.append(era.batchnorm(np.zeros(2, np.float32), np.ones(2, np.float32),
                                    np.zeros(2, np.float32), np.ones(2, np.float32)))
    return era.file(era.chain(layers))


def test_conv_layouts_flux_writes_are_accepted():
    from sealbox.worker.flux.scanner import scan_bytes
    for era_name, groups in (("0.10", False), ("0.12", False), ("0.12", True), ("0.13", True)):
        verdict = scan_bytes(conv_chain(Era(era_name), groups), "model.bson")
        assert verdict.status == "accepted", (era_name, groups, verdict.reasons)
    verdict = scan_bytes(conv_chain(Era("0.13"), True, bias="false"), "model.bson")
    assert verdict.status == "accepted", verdict.reasons


@pytest.mark.parametrize("era_name, groups, bias, message", [
    # groups (0.12.6+) beside the 8-field BatchNorm of Flux <= 0.11
    ("0.10", True, "array",
     "Conv{N,M,F,A,V} with 7 fields (groups) is written by Flux 0.12.6 and later, but model.layers[2] "
     "(BatchNorm with 8 fields) only by Flux 0.8.0 to 0.11.x: no Flux version writes this layout"),
    # bias = false (0.13+) in a Conv without groups (<= 0.12.5)
    ("0.13", False, "false",
     "Conv{N,M,F,A,V} with 6 fields (no groups) is written by Flux 0.8.3 to 0.12.5, but model.layers[1].bias "
     "(bias false) only by Flux 0.13.0 and later: no Flux version writes this layout"),
    # no groups beside the 4-field Dropout with an RNG (0.13+)
    ("0.13", False, "array",
     "Conv{N,M,F,A,V} with 6 fields (no groups) is written by Flux 0.8.3 to 0.12.5, but model.layers[2] "
     "(Dropout{F,D,R} with 4 fields) only by Flux 0.13.0 and later: no Flux version writes this layout"),
])
def test_conv_field_count_no_flux_version_writes_is_refused(era_name, groups, bias, message):
    from sealbox.worker.flux.scanner import scan_bytes
    era = Era(era_name)
    if era_name == "0.13" and bias == "array":
        weight = RNG.standard_normal((3, 3, 1, 2)).astype(np.float32)
        conv_value, conv_type = era.conv(weight, np.zeros(2, np.float32))
        conv_value["data"].pop()
        data = era.file(era.chain([(conv_value, conv_type), era.dropout(0.5)]))
    else:
        data = conv_chain(era, groups, bias, with_bn=(bias == "array"))
    verdict = scan_bytes(data, "model.bson")
    assert verdict.status == "refused"
    assert [(r.place, r.message) for r in verdict.reasons] == [("model.layers[1]", message)]


def test_corpus_conv_and_batchnorm_files_keep_their_verdicts():
    """Real files: the Flux 0.13 Conv/BatchNorm model is still accepted; the Flux 0.10 conv model is still
    refused for its closure (and not for its Conv layout)."""
    from tests.support import require_shared
    from sealbox.worker.flux.scanner import scan_file
    corpus = require_shared("corpus/bsonjl")
    ok = scan_file(corpus / "banachtech+replicator/model.6f42a183.bson")
    assert ok.status == "accepted", ok.reasons
    closure = scan_file(corpus / "DhairyaLGandhi+JuliaCon2020_dash/model_conv.7d17a1f4.bson")
    assert closure.status == "refused"
    assert not any("no Flux version writes" in r.message for r in closure.reasons)
    assert any("serialized closure" in r.message for r in closure.reasons)
