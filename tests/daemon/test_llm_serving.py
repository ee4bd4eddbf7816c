"""mlx-lm language models through a real daemon (issue 14): tiny Llama models made by the tests, signed,
served by sandboxed workers; generations equal mlx_lm's in-process token for token; hostile chat templates
and remote-code configs refused with the file named."""
from __future__ import annotations

import json
import pathlib

import grpc
import numpy as np
import pytest

from tests.support.llm import make_tiny_llm, quantize_llm, reference_generate
from tests.support.pki import upstream_sign

pytestmark = pytest.mark.slow   # building, signing and loading language models

PROMPT = "the quick brown fox"
# Payloads that reach for Python internals through a template (jinja2's sandbox must stop each).
MRO = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
WRITER = ("{{ cycler.__init__.__globals__.os.popen('touch PATH') }}"
          "{{ self.__init__.__globals__.__builtins__.open('PATH', 'w').write('x') }}")
REFUSED = "worker exited with code 3 (model refused by the engine) while loading: model refused: "


def _signed(path: pathlib.Path, key) -> pathlib.Path:
    upstream_sign(path, key)
    return path


@pytest.fixture(scope="module")
def llm_models(tmp_path_factory, keys):
    root = tmp_path_factory.mktemp("llm-models")
    written = root / "written-by-template"
    tiny = make_tiny_llm(root / "tiny")
    q4 = quantize_llm(tiny, root / "q4")
    models = {"tiny": tiny, "q4": q4,
              "mro": make_tiny_llm(root / "mro", chat_template=MRO),
              "writer": make_tiny_llm(root / "writer", chat_template=WRITER.replace("PATH", str(written)),
                                      template_file=True)}
    remote = make_tiny_llm(root / "remote")
    config = json.loads((remote / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (remote / "config.json").write_text(json.dumps(config))
    (remote / "modeling_evil.py").write_text(f"open({str(written)!r}, 'w').write('pwned')\n")
    models["remote"] = remote
    unknown = make_tiny_llm(root / "unknown-arch")
    config = json.loads((unknown / "config.json").read_text())
    config["model_type"] = "evil_arch"
    (unknown / "config.json").write_text(json.dumps(config))
    models["unknown-arch"] = unknown
    # Generates until its time budget: no EOS it could ever sample (the tokenizer has none, config's is past
    # the vocabulary).
    long = make_tiny_llm(root / "long")
    config = json.loads((long / "config.json").read_text())
    config["eos_token_id"] = [100000]
    (long / "config.json").write_text(json.dumps(config))
    tokenizer_config = json.loads((long / "tokenizer_config.json").read_text())
    tokenizer_config["eos_token"] = None
    (long / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    models["long"] = long
    for path in models.values():
        _signed(path, keys[0])
    return models, written


@pytest.fixture(scope="module")
def llm_daemon(llm_models, keys, tmp_path_factory):
    from tests.support.daemon import Daemon

    models, _ = llm_models
    table = {name: {"path": path, "format": "mlx-lm"} for name, path in models.items()}
    table["tiny"]["options"] = "max_prompt_tokens = 64\nmax_new_tokens = 48\nrequest_time_s = 60"
    table["long"]["options"] = "max_new_tokens = 100000\nrequest_time_s = 8"
    # A short idle timeout: until the framed hop lands, a stream waiting for a final flag ends by it.
    daemon = Daemon(tmp_path_factory.mktemp("llm-daemon"), table, keys[1],
                    extra="[server.limits]\nstream_idle_s = 10").start()
    yield daemon
    daemon.stop()


def _request(text: str | None = PROMPT, sampling: dict | None = None, messages=None) -> dict:
    inputs = {}
    if text is not None:
        inputs["text_input"] = np.array([text.encode()], dtype=object)
    if messages is not None:
        inputs["messages"] = np.array([json.dumps(messages).encode()], dtype=object)
    if sampling is not None:
        inputs["sampling_parameters"] = np.array([json.dumps(sampling).encode()], dtype=object)
    return inputs


@pytest.mark.parametrize("name", ["tiny", "q4"])
def test_greedy_generation_equals_mlx_lm_in_process(llm_daemon, llm_models, name):
    expected = reference_generate(llm_models[0][name], PROMPT, max_tokens=40)
    with llm_daemon.client() as client:
        out = client.infer(name, _request(sampling={"max_tokens": 40}), outputs=["text_output", "output_ids"])
        assert out["output_ids"].dtype == np.int64
        assert out["output_ids"].tolist() == expected
        # Without requested outputs only the text comes back (default_outputs), the same text.
        text_only = client.infer(name, _request(sampling={"max_tokens": 40}))
        meta = client.metadata(name)
    assert set(text_only) == {"text_output"} and text_only["text_output"].tolist() == out["text_output"].tolist()
    assert out["text_output"].dtype == object and out["text_output"].shape == (1,)
    assert meta.platform == "mlx-lm"
    assert [(t.name, t.datatype) for t in meta.outputs] == [("text_output", "BYTES"), ("output_ids", "INT64")]


def test_chat_messages_render_through_the_template(llm_daemon, llm_models):
    from mlx_lm import load, stream_generate

    messages = [{"role": "user", "content": "the lazy dog"}]
    model, tokenizer = load(str(llm_models[0]["tiny"]))
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == "<|user|>the lazy dog\n<|assistant|>"
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    expected = [r.token for r in stream_generate(model, tokenizer, ids, max_tokens=12) if r.finish_reason != "stop"]
    with llm_daemon.client() as client:
        out = client.infer("tiny", _request(None, {"max_tokens": 12}, messages), outputs=["output_ids"])
    assert out["output_ids"].tolist() == expected


@pytest.mark.parametrize("name, where, payload", [
    ("mro", "tokenizer_config.json (chat_template)", "access to attribute '__class__' of 'str' object is unsafe"),
    ("writer", "chat_template.jinja", "is unsafe"),
])
def test_hostile_chat_templates_are_refused_and_write_nothing(llm_daemon, llm_models, name, where, payload):
    written = llm_models[1]
    with llm_daemon.client() as client:
        with pytest.raises(grpc.RpcError) as err:
            client.infer(name, _request(None, {"max_tokens": 4}, [{"role": "user", "content": "hi"}]))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details().startswith(f"{where}: the chat template was stopped by the Jinja sandbox: ")
        assert payload in err.value.details()
        # The model still serves plain prompts: only the template is refused.
        assert client.infer(name, _request(sampling={"max_tokens": 3}))["text_output"].shape == (1,)
    assert not written.exists()


@pytest.mark.parametrize("name, message", [
    ("remote", "config.json: asks for code from the model repository ('auto_map'); sealbox never runs remote "
               "code (trust_remote_code)"),
    ("unknown-arch", "config.json: model_type 'evil_arch' is not an architecture mlx-lm 0.32.2 implements natively"),
])
def test_remote_code_and_unknown_architectures_are_refused(llm_daemon, llm_models, name, message):
    with llm_daemon.client() as client:
        status = client.status(name)
        assert status.state == "UNAVAILABLE"
        assert status.reason == REFUSED + message
        with pytest.raises(grpc.RpcError) as err:
            client.infer(name, _request())
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert not llm_models[1].exists()


@pytest.mark.parametrize("inputs, message", [
    (_request("fox " * 200), "the prompt is"),
    (_request(sampling={"max_tokens": 49}), "input 'sampling_parameters': 'max_tokens' must be a number in [1, 48], not 49"),
    (_request(sampling={"top_k": 3}), "input 'sampling_parameters': unknown keys ['top_k'] (known: ['max_tokens', "
                                      "'temperature', 'top_p', 'seed', 'stop'])"),
    ({**_request(), **_request(None, None, [{"role": "user", "content": "x"}])},
     "give exactly one of the inputs 'text_input' and 'messages'"),
    ({"text_input": np.array([b"\xff"], dtype=object)}, "input 'text_input': not UTF-8"),
])
def test_limits_and_malformed_requests(llm_daemon, inputs, message):
    with llm_daemon.client() as client:
        with pytest.raises(grpc.RpcError) as err:
            client.infer("tiny", inputs)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(message), err.value.details()


def test_stop_strings_and_seeded_sampling(llm_daemon):
    with llm_daemon.client() as client:
        full = client.infer("tiny", _request(sampling={"max_tokens": 30}))["text_output"][0]
        stop = full[5:8].decode()
        cut = client.infer("tiny", _request(sampling={"max_tokens": 30, "stop": [stop]}))["text_output"][0]
        sampled = [client.infer("tiny", _request(sampling={"max_tokens": 20, "temperature": 1.0, "seed": 7}),
                                outputs=["output_ids"])["output_ids"].tolist() for _ in range(2)]
    assert cut == full[:full.index(stop.encode())]
    assert sampled[0] == sampled[1]


def _triton_probe(daemon, model: str, max_tokens: int, mode: str) -> dict:
    import subprocess

    from tests.support import PYTHON
    probe = pathlib.Path(__file__).with_name("triton_llm_probe.py")
    result = subprocess.run([PYTHON, str(probe), daemon.target, model, PROMPT, str(max_tokens), mode],
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_stock_tritonclient_unary_generation(llm_daemon, llm_models):
    expected = reference_generate(llm_models[0]["tiny"], PROMPT, max_tokens=30)
    found = _triton_probe(llm_daemon, "tiny", 30, "unary")
    assert found["unary_ids"] == expected and found["unary_text"]




def test_stock_tritonclient_stream_is_piece_by_piece_and_flagged_final(llm_daemon, llm_models):
    found = _triton_probe(llm_daemon, "tiny", 30, "stream")
    assert found["stream_errors"] == [] and found["stream_final"] is True
    assert len(found["stream_pieces"]) > 1
    # Streamed or not, the same generation, token for token with mlx_lm in-process.
    assert "".join(found["stream_pieces"]) == found["unary_text"]
    assert found["stream_ids"] == found["unary_ids"] == reference_generate(llm_models[0]["tiny"], PROMPT, 30)


def test_client_generate_equals_unary_text(llm_daemon):
    with llm_daemon.client() as client:
        pieces = list(client.generate("tiny", PROMPT, max_tokens=30))
        whole = client.infer("tiny", _request(sampling={"max_tokens": 30}))["text_output"][0].decode()
    assert "".join(pieces) == whole


def test_client_generate_streams_pieces(llm_daemon):
    with llm_daemon.client() as client:
        pieces = list(client.generate("tiny", PROMPT, max_tokens=30))
    assert len(pieces) > 1


def test_a_disconnecting_client_stops_generation(llm_daemon):
    """The worker burns CPU while it generates; once the client goes away it must go idle (no timing assert on
    the call itself: CPU seconds the worker spends in a window, against the same window while generating)."""
    import time

    import psutil

    def cpu_in(proc, seconds):
        before = sum(proc.cpu_times()[:2])
        time.sleep(seconds)
        return sum(proc.cpu_times()[:2]) - before

    with llm_daemon.client() as client:
        workers = [p for p in psutil.Process(llm_daemon.proc.pid).children(recursive=True)
                   if "sealbox.worker.main" in " ".join(p.cmdline()) and "mlx-lm" in " ".join(p.cmdline())]
        assert workers
        stream = client.generate("long", PROMPT, max_tokens=100000)
        next(stream)
        # Read as a client does: a stream nobody reads stops its generation by flow control alone
        # (gRPC's window, then the hop's socket), which would prove nothing here.
        cpu = lambda: {w.pid: sum(w.cpu_times()[:2]) for w in workers}  # noqa: E731
        before, start = cpu(), time.monotonic()
        for _ in range(200):
            next(stream)
        after, spent = cpu(), time.monotonic() - start
        busy = max(after[pid] - before[pid] for pid in before) / spent   # CPU seconds per second
        stream.close()   # the client goes away
        time.sleep(1.0)
        idle = max(cpu_in(w, 1.0) for w in workers)
    assert busy > 0.5 and idle < 0.2, (busy, idle)


def test_cli_generate_prints_the_generation(llm_daemon):
    import subprocess

    from tests.support import PYTHON
    with llm_daemon.client() as client:
        whole = client.infer("tiny", _request(sampling={"max_tokens": 20}))["text_output"][0].decode()
    result = subprocess.run([PYTHON, "-m", "sealbox.client.cli", "--target", llm_daemon.target, "generate", "tiny",
                             PROMPT, "--max-tokens", "20"], capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stdout, result.stderr) == (0, whole + "\n", "")
    refused = subprocess.run([PYTHON, "-m", "sealbox.client.cli", "--target", llm_daemon.target, "generate", "tiny",
                              PROMPT, "--max-tokens", "4000"], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1
    assert refused.stderr.startswith("sealbox: ") and "'max_tokens' must be a number in [1, 48]" in refused.stderr
