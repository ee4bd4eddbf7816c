"""Flux.jl models saved with BSON.jl: strict reader, allowlist scanner, native evaluator.

`BSON.load` can run code from the file, so nothing here loads a file that the
allowlist scanner has not accepted. Modules, each using only those above it:

    bson.py           strict BSON reader: exact lengths, canonical array keys, no duplicate
                      keys, no trailing bytes, only BSON.jl's element types, limits
    julia_types.py    Julia types as BSON.jl writes them: JType (a parsed datatype), name
                      normalisation, Julia float/int element types -> numpy dtypes
    records.py        the layer records of an accepted model (Dense, Conv, Pool, BatchNorm,
                      Dropout, Function, Chain), Model, and the scanner's Verdict and Reason
    shapes.py         shape propagation through layers (layer_shape, input_shape, leaves,
                      ShapeError), for the scanner and for both engines at inference
    scanner.py        the allowlist scanner: its limits and allowlists, the scanner class, and
                      the entry points scan_file / scan_bytes -> Verdict, read_file
    evaluator.py      the numpy Evaluator of accepted models (inference mode)
    loading.py        the load steps both engines share: the one .bson file, read and scanned
                      once (scan_model), and the model's tensor specs
    native_engine.py  FluxNativeEngine (format `flux`, platform `flux-native`)
    julia_engine.py   JuliaEngine (format `julia`, platform `flux-julia`): the same scan, then
                      BSON.load + Flux in real Julia through juliacall
    scan_cli.py       `sealbox scan FILE.bson [--json] [--name NAME]`
"""
