"""Language models (format = "mlx-lm"): tokens per second and time to first token through sealbox (client ->
supervisor -> sandboxed worker) against mlx_lm in-process on the same model, same run; the worker's memory
against the weights' size. Two random Llama models: the tests' tiny one and a ~100M-parameter one (bf16).

Neither model can stop early: its tokenizer has no EOS and config.json's is past the vocabulary, so every
run generates exactly TOKENS tokens, greedily. Tokens per second: one whole generation (through sealbox a
ModelInfer call, its output_ids counted). Time to first token: from the request until the first piece of
text arrives, through sealbox the first piece client.generate yields (ModelStreamInfer, streamed over the
hop), in-process the first stream_generate response with text (a token whose text is still an incomplete
character streams nothing on either side). Both sides run MLX with Debian's OpenBLAS loaded, as the
workers do (`[workers] openblas`)."""
from __future__ import annotations

import ctypes
import json
import os
import pathlib
import statistics
import tempfile
import time

import numpy as np

TOKENS = int(os.environ.get("BENCH_LLM_TOKENS", "128"))
REPEATS = int(os.environ.get("BENCH_LLM_REPEATS", "3"))
PROMPT = "the quick brown fox jumps over the lazy dog"
# ~100M parameters: 14 layers of 4 * 768^2 attention + 3 * 768 * 2048 MLP, plus embeddings.
BIG = {"hidden": 768, "layers": 14, "heads": 12, "intermediate": 2048}


def _without_eos(path: pathlib.Path) -> None:
    config = json.loads((path / "config.json").read_text())
    config["eos_token_id"] = [100000]
    (path / "config.json").write_text(json.dumps(config))
    tc = json.loads((path / "tokenizer_config.json").read_text())
    tc["eos_token"] = None
    (path / "tokenizer_config.json").write_text(json.dumps(tc))


def _make_models(root: pathlib.Path) -> dict[str, pathlib.Path]:
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_map
    from mlx_lm.models import llama

    from tests.support.llm import llama_config, make_tiny_llm

    from tokenizers import Tokenizer

    tiny = make_tiny_llm(root / "tiny")
    # The embedding only as large as the tokenizer's trained vocabulary: a random model greedily picks ids
    # past it, whose text is empty, and a generation without text streams nothing to time.
    vocab = Tokenizer.from_file(str(tiny / "tokenizer.json")).get_vocab_size()
    big = make_tiny_llm(root / "big", config=llama_config(**BIG, vocab=vocab))
    model = llama.Model(llama.ModelArgs.from_dict(llama_config(**BIG, vocab=vocab)))
    params = tree_map(lambda a: a.astype(mx.bfloat16), model.parameters())
    mx.save_safetensors(str(big / "model.safetensors"), dict(tree_flatten(params)))
    for path in (tiny, big):
        _without_eos(path)
    return {"tiny": tiny, "big": big}


def _in_process(path: pathlib.Path) -> tuple[list[float], list[float]]:
    from mlx_lm import load, stream_generate

    model, tokenizer = load(str(path))
    ttft, tps = [], []
    for _ in range(REPEATS + 1):
        t = time.perf_counter()
        first = None
        n = 0
        for response in stream_generate(model, tokenizer, PROMPT, max_tokens=TOKENS):
            n += 1
            if first is None and response.text:
                first = time.perf_counter() - t
        total = time.perf_counter() - t
        assert n == TOKENS and first is not None, (n, first)
        ttft.append(first)
        tps.append(TOKENS / total)
    return ttft[1:], tps[1:]   # the first run warms up


def _through_sealbox(client, name: str) -> tuple[list[float], list[float]]:
    def request(n):
        return {"text_input": np.array([PROMPT.encode()], dtype=object),
                "sampling_parameters": np.array([json.dumps({"max_tokens": n}).encode()], dtype=object)}
    ttft, tps = [], []
    for i in range(REPEATS + 1):
        t = time.perf_counter()
        stream = client.generate(name, PROMPT, max_tokens=TOKENS)
        next(stream)   # the first streamed piece of text
        first = time.perf_counter() - t
        stream.close()   # cancels the rest of the generation
        time.sleep(1.0)   # ... which ends at the worker's next token: not inside the timing below
        t = time.perf_counter()
        out = client.infer(name, request(TOKENS), outputs=["output_ids"])
        total = time.perf_counter() - t
        assert len(out["output_ids"]) == TOKENS, len(out["output_ids"])
        ttft.append(first)
        tps.append(TOKENS / total)
    return ttft[1:], tps[1:]


def _worker_rss(daemon, name: str) -> int:
    """RSS of the model's worker: the python below the bwrap whose socket directory is named after the model."""
    import psutil
    for proc in psutil.Process(daemon.proc.pid).children(recursive=True):
        try:
            if proc.name() == "bwrap" and f"-{name}-" in " ".join(proc.cmdline()):
                return max(p.memory_info().rss for p in proc.children(recursive=True)
                           if p.name().startswith("python"))
        except (psutil.Error, ValueError):
            continue
    raise RuntimeError(f"no worker found for {name}")


def main() -> None:
    from sealbox.sandbox.profile import find_openblas
    blas = find_openblas()
    if blas:   # as the workers do, before MLX is imported
        ctypes.CDLL(blas, mode=os.RTLD_GLOBAL | os.RTLD_NOW)
    os.environ.setdefault("MLX_DISABLE_COMPILE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sealbox.client import publisher
    from tests.support.daemon import Daemon
    from tests.support.pki import make_ec_key

    root = pathlib.Path(tempfile.mkdtemp(prefix="sealbox-bench-llm-"))
    os.chmod(root, 0o755)
    (root / "keys").mkdir()
    key, public = make_ec_key(root / "keys", "llm-signer")
    models = _make_models(root / "models")
    for path in models.values():
        publisher.main(["sign", "key", str(path), "--private-key", str(key)])
    limits = f"max_new_tokens = {TOKENS}\nrequest_time_s = 600"
    daemon = Daemon(root, {n: {"path": p, "format": "mlx-lm", "options": limits} for n, p in models.items()},
                    public).start()
    from sealbox.client import Client
    try:
        with Client(daemon.target, timeout=600) as client:
            for name, path in models.items():
                weights = (path / "model.safetensors").stat().st_size
                local_ttft, local_tps = _in_process(path)
                remote_ttft, remote_tps = _through_sealbox(client, name)
                rss = _worker_rss(daemon, name)
                lt, rt = statistics.median(local_tps), statistics.median(remote_tps)
                print(f"{name}: weights {weights / 2**20:.1f} MiB, {TOKENS} tokens, medians of {REPEATS}")
                print(f"  tokens/s      sealbox {rt:8.1f}   mlx_lm in-process {lt:8.1f}   ratio {rt / lt:.2f}")
                print(f"  first token   sealbox {statistics.median(remote_ttft) * 1e3:8.1f} ms"
                      f"   mlx_lm in-process {statistics.median(local_ttft) * 1e3:8.1f} ms")
                print(f"  worker RSS    {rss / 2**20:.0f} MiB ({rss / weights:.1f}x the weights)")
    finally:
        daemon.stop()


if __name__ == "__main__":
    main()
