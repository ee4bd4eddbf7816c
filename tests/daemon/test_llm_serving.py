"""mlx-lm language models through a real daemon (issue 14): tiny Llama models made by the tests, signed,
served by sandboxed workers; generations equal mlx_lm's in-process token for token; hostile chat templates
and remote-code configs refused with the file named."""
from __future__ import annotations

import json
import pathlib
import re
import socket
import time
import urllib.request

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def llm_daemon(llm_models, keys, tmp_path_factory):
    from tests.support.daemon import Daemon

    models, _ = llm_models
    table = {name: {"path": path, "format": "mlx-lm"} for name, path in models.items()}
    table["tiny"]["options"] = "max_prompt_tokens = 64\nmax_new_tokens = 48\nrequest_time_s = 60"
    # Generates until cancelled: its budget is far beyond any test.
    table["long"]["options"] = "max_new_tokens = 100000\nrequest_time_s = 300"
    # The same model, ended by its time budget after 8 s (longer than [workers] infer_timeout_s below).
    table["budget"] = {"path": models["long"], "format": "mlx-lm",
                       "options": "max_new_tokens = 100000\nrequest_time_s = 8"}
    port = _free_port()
    # One turn per model (model_inflight = 1) and one short queue: a call behind a running one waits 2 s at
    # most. infer_timeout_s = 3 would kill a worker in any generation longer than that, were it applied.
    daemon = Daemon(tmp_path_factory.mktemp("llm-daemon"), table, keys[1], workers="infer_timeout_s = 3",
                    server=f'metrics = "127.0.0.1:{port}"',
                    extra="[server.limits]\nmodel_inflight = 1\nmodel_queue = 1\nmodel_queue_timeout_s = 2").start()
    daemon.metrics_port = port
    yield daemon
    daemon.stop()


def _requests(daemon, model: str) -> dict[str, float]:
    """sealbox_requests_total of a model from /metrics, by gRPC status code."""
    with urllib.request.urlopen(f"http://127.0.0.1:{daemon.metrics_port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    found = {}
    for labels, number in re.findall(r"^sealbox_requests_total\{([^}]*)\} (\S+)$", text, re.M):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        if labels.get("model") == model:
            found[labels["code"]] = float(number)
    return found


def _statistics(daemon, model: str):
    """Triton's ModelStatistics of a model (over the admin socket: the statistics role)."""
    from sealbox.proto import inference_pb2 as pb
    from sealbox.proto import inference_pb2_grpc
    with grpc.insecure_channel(daemon.admin_target) as channel:
        stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
        return stub.ModelStatistics(pb.ModelStatisticsRequest(name=model), timeout=10).model_stats[0]


def _worker(daemon, model: str):
    """The model's worker process: the python below the bwrap whose socket directory is named after the model
    (as benchmarks/bench_llm.py finds it)."""
    import psutil
    for proc in psutil.Process(daemon.proc.pid).children(recursive=True):
        try:
            if proc.name() == "bwrap" and f"-{model}-" in " ".join(proc.cmdline()):
                pythons = [p for p in proc.children(recursive=True) if p.name().startswith("python")]
                if len(pythons) == 1:
                    return pythons[0]
        except psutil.Error:
            continue
    raise AssertionError(f"no worker found for model {model!r}")


def _cpu(proc) -> float:
    """CPU seconds (user + system) the process has spent, all its threads."""
    times = proc.cpu_times()
    return times.user + times.system


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




@pytest.mark.parametrize("name", ["tiny", "q4"])
def test_stock_tritonclient_stream_is_piece_by_piece_and_flagged_final(llm_daemon, llm_models, name):
    found = _triton_probe(llm_daemon, name, 30, "stream")
    assert found["stream_errors"] == [] and found["stream_final"] is True
    assert len(found["stream_pieces"]) > 1
    # Streamed or not, the same generation, token for token with mlx_lm in-process.
    assert "".join(found["stream_pieces"]) == found["unary_text"]
    assert found["stream_ids"] == found["unary_ids"] == reference_generate(llm_models[0][name], PROMPT, 30)


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
    """`long` generates until its 300 s budget: only the cancellation can stop it. Its worker burns CPU while
    it generates; once the client closes the stream that process must go idle within seconds, the call is
    counted CANCELLED, the worker lives on, and its one turn is free at once for the next call."""
    worker = _worker(llm_daemon, "long")
    before = _requests(llm_daemon, "long")
    with llm_daemon.client() as client:
        stream = client.generate("long", PROMPT)   # max_tokens: the model's 100000
        next(stream)
        # Read as a client does: a stream nobody reads stops its generation by flow control alone
        # (gRPC's window, then the hop's socket), which would prove nothing here.
        cpu, start = _cpu(worker), time.monotonic()
        for _ in range(200):
            next(stream)
        busy = (_cpu(worker) - cpu) / (time.monotonic() - start)   # CPU seconds per second
        stream.close()   # the client goes away
        _check_generation_stopped(llm_daemon, client, worker, busy, before)


def test_a_unary_call_abandoned_by_its_client_stops_generation(llm_daemon):
    """The same for ModelInfer (one response with the whole text): a client that cancels its call while
    `long` generates stops the generation at the worker, not only its own wait."""
    from sealbox.proto import tensors
    worker = _worker(llm_daemon, "long")
    before = _requests(llm_daemon, "long")
    with llm_daemon.client() as client:
        call = client._infer_raw.future(tensors.encode_request("long", _request(), None), timeout=120)
        time.sleep(1.0)   # generating by now
        cpu, start = _cpu(worker), time.monotonic()
        time.sleep(1.0)
        busy = (_cpu(worker) - cpu) / (time.monotonic() - start)
        assert not call.done()
        call.cancel()   # the client goes away
        _check_generation_stopped(llm_daemon, client, worker, busy, before)


def _check_generation_stopped(daemon, client, worker, busy: float, before: dict) -> None:
    """After the client went away: `long`'s worker goes idle within 5 s, lives on, its one turn is free at
    once for the next call, and the abandoned call is counted CANCELLED."""
    closed = time.monotonic()
    while True:   # CPU per second over half-second windows, until it is idle (or 10 s have passed)
        cpu = _cpu(worker)
        time.sleep(0.5)
        rate = (_cpu(worker) - cpu) / 0.5
        if rate < 0.2 or time.monotonic() - closed > 10:
            break
    went_idle_s = time.monotonic() - closed
    cpu = _cpu(worker)
    time.sleep(1.0)
    idle = _cpu(worker) - cpu
    assert busy > 0.5, busy
    assert went_idle_s < 5 and idle < 0.2, (went_idle_s, idle)
    assert worker.is_running() and _worker(daemon, "long").pid == worker.pid
    # With one turn for the model (model_inflight = 1, a 2 s queue), a generation still running would
    # make this wait and fail UNAVAILABLE.
    after_close = client.infer("long", _request(sampling={"max_tokens": 3}), outputs=["output_ids"])
    assert len(after_close["output_ids"]) == 3
    deadline = time.monotonic() + 10   # the front door counts the call once its handler has ended
    while _requests(daemon, "long").get("CANCELLED", 0) == before.get("CANCELLED", 0) \
            and time.monotonic() < deadline:
        time.sleep(0.1)
    after = _requests(daemon, "long")
    assert after.get("CANCELLED", 0) - before.get("CANCELLED", 0) == 1
    assert after.get("OK", 0) - before.get("OK", 0) == 1   # the call after it


def test_the_request_time_budget_replaces_the_inference_timeout(llm_daemon):
    """[workers] infer_timeout_s = 3 here, `budget`'s request_time_s = 8: an mlx-lm worker is timed by its
    model's budget instead, so a generation of 8 s answers OK with its text, and the worker is not killed."""
    worker = _worker(llm_daemon, "budget")
    with llm_daemon.client() as client:
        start = time.monotonic()
        out = client.infer("budget", _request(), outputs=["text_output", "output_ids"])   # 100000 tokens asked
        took = time.monotonic() - start
        status = client.status("budget")
    assert 8 <= took < 12, took
    assert len(out["output_ids"]) > 20 and len(out["text_output"][0]) > 20
    assert status.state == "READY"
    assert worker.is_running() and _worker(llm_daemon, "budget").pid == worker.pid
    assert not [e for e in llm_daemon.audit_events() if e["event"] in ("infer_timeout", "worker_died")
                and e.get("model") == "budget"]


def test_a_long_stream_is_one_call_in_the_front_door(llm_daemon):
    """A stream holds the model's one turn (model_inflight = 1) for its whole generation: a second call
    queues, and is refused when its queue time (2 s) is up while the stream goes on; the stream's many
    responses count as one request in /metrics and ModelStatistics."""
    before, stats = _requests(llm_daemon, "budget"), _statistics(llm_daemon, "budget")
    with llm_daemon.client() as client:
        stream = client.generate("budget", PROMPT)   # ends by its 8 s budget
        pieces = [next(stream)]
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            client.infer("budget", _request(sampling={"max_tokens": 2}))
        waited = time.monotonic() - start
        pieces += list(stream)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert err.value.details() == "model 'budget' is unavailable: busy: no turn within 2 s"
    assert 2 <= waited < 5, waited
    assert len(pieces) > 20
    after, stats_after = _requests(llm_daemon, "budget"), _statistics(llm_daemon, "budget")
    assert after.get("OK", 0) - before.get("OK", 0) == 1
    assert after.get("UNAVAILABLE", 0) - before.get("UNAVAILABLE", 0) == 1
    assert set(after) - {"OK", "UNAVAILABLE"} == set(before) - {"OK", "UNAVAILABLE"}
    success = stats_after.inference_stats.success.count - stats.inference_stats.success.count
    fail = stats_after.inference_stats.fail.count - stats.inference_stats.fail.count
    assert (success, fail) == (1, 1)
    assert stats_after.inference_count - stats.inference_count == 1


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


def test_the_worker_memory_limit_is_sized_from_the_weights(daemon_factory, llm_models, keys):
    """An mlx-lm worker's cgroup limit is 512 MiB + twice the model's verified bytes when that exceeds the
    configured memory_mb (here 64 MiB: a floor that could not hold the interpreter with transformers)."""
    from sealbox.sandbox.profile import LLM_MEMORY_BASE
    from tests.daemon.test_warm_pool import memory_max
    models, _ = llm_models
    daemon = daemon_factory({"tiny": {"path": models["tiny"], "format": "mlx-lm", "options": "memory_mb = 64"}},
                            keys[1]).start()
    signed = [p for p in models["tiny"].iterdir() if p.is_file() and p.name != "model.sig"]
    weights = sum(p.stat().st_size for p in signed)
    page = 4096   # the kernel keeps the limit in whole pages, rounded down
    assert memory_max(_worker(daemon, "tiny").pid) == str((LLM_MEMORY_BASE + 2 * weights) // page * page)
    with daemon.client() as client:   # and it serves within that limit
        out = client.infer("tiny", _request(sampling={"max_tokens": 4}), outputs=["output_ids"])
    assert len(out["output_ids"]) == 4
