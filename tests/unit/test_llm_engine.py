"""The mlx-lm engine in-process (issue 14): loaded from sealed memfds exactly as a worker gets them, compared
with mlx_lm token for token, streaming piece by piece, cancellation, and the refusals at load."""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import threading

import numpy as np
import pytest

from tests.support.llm import make_tiny_llm, reference_generate
from tests.support.models import sealed_files

PROMPT = "the quick brown fox"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_llm(tmp_path_factory.mktemp("llm") / "tiny")


@pytest.fixture(scope="module")
def engine(tiny):
    from sealbox.worker.llm_engine import LlmEngine
    return LlmEngine.load(sealed_files(tiny), max_new_tokens=64)


def _inputs(sampling: dict, text: str = PROMPT, stream: bool = True) -> dict:
    return {"text_input": np.array([text.encode()], dtype=object), "stream": np.array([stream]),
            "sampling_parameters": np.array([json.dumps(sampling).encode()], dtype=object)}


def test_streaming_pieces_equal_mlx_lm_token_for_token(engine, tiny):
    from mlx_lm import load, stream_generate

    model, tokenizer = load(str(tiny))
    reference = [r for r in stream_generate(model, tokenizer, PROMPT, max_tokens=40)]
    expected_ids = [r.token for r in reference if r.finish_reason != "stop"]
    pieces = list(engine.responses(_inputs({"max_tokens": 40}), streaming=True, cancelled=threading.Event()))
    assert len(pieces) > 1
    assert [i for p in pieces for i in p["output_ids"].tolist()] == expected_ids
    assert b"".join(p["text_output"][0] for p in pieces).decode() == "".join(r.text for r in reference)
    # Unary, or a stream whose `stream` input is false or absent (vLLM's convention): one response.
    for inputs, streaming in ((_inputs({"max_tokens": 40}), False), (_inputs({"max_tokens": 40}, stream=False), True),
                              ({k: v for k, v in _inputs({"max_tokens": 40}).items() if k != "stream"}, True)):
        whole = list(engine.responses(inputs, streaming=streaming, cancelled=threading.Event()))
        assert len(whole) == 1 and whole[0]["output_ids"].tolist() == expected_ids
    assert engine.infer(_inputs({"max_tokens": 40}))["output_ids"].tolist() == expected_ids
    assert reference_generate(tiny, PROMPT, 40) == expected_ids


class CountingModel:
    """The engine's model, counting forward passes (one per generated token after the prompt)."""

    def __init__(self, model):
        self.model, self.calls = model, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.model(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.model, name)


def test_cancellation_stops_generation(engine):
    counting = CountingModel(engine.model)
    engine.model = counting
    try:
        cancelled = threading.Event()
        pieces = []
        for piece in engine.responses(_inputs({"max_tokens": 60}), streaming=True, cancelled=cancelled):
            pieces.append(piece)
            at_cancel = counting.calls
            cancelled.set()   # the client went away after its first piece
        # Nothing more is sent, and at most the step mlx_lm already computed ahead runs after the cancel.
        assert len(pieces) == 1 and counting.calls <= at_cancel + 1, (at_cancel, counting.calls)
        counting.calls = 0
        list(engine.responses(_inputs({"max_tokens": 60}), streaming=True, cancelled=threading.Event()))
        assert counting.calls >= 59   # the control: uncancelled, all 60 tokens are generated
    finally:
        engine.model = counting.model


def test_time_budget_ends_a_generation(tiny):
    from sealbox.worker.llm_engine import LlmEngine
    quick = LlmEngine.load(sealed_files(tiny), request_time_s=1e-9)
    out = quick.infer(_inputs({"max_tokens": 60}))
    assert len(out["output_ids"]) == 1   # one token, then the budget was spent


def test_hostile_template_writes_nothing_outside_any_sandbox(tmp_path):
    """No worker sandbox here: only jinja2's sandbox stands between the template and the file."""
    from sealbox.worker.engine import InputError
    from sealbox.worker.llm_engine import LlmEngine

    target = tmp_path / "pwned"
    template = ("{{ cycler.__init__.__globals__.os.popen('touch T') }}"
                "{{ ''.__class__.__mro__[1].__subclasses__() }}").replace("T", str(target))
    model = make_tiny_llm(tmp_path / "m", chat_template=template, template_file=True)
    engine = LlmEngine.load(sealed_files(model))
    with pytest.raises(InputError) as err:
        engine.infer({"messages": np.array([b'[{"role": "user", "content": "hi"}]'], dtype=object)})
    assert str(err.value).startswith("chat_template.jinja: the chat template was stopped by the Jinja sandbox: ")
    assert not target.exists()


@pytest.mark.parametrize("change, message", [
    (lambda d: _edit(d, "config.json", trust_remote_code=True),
     "config.json: asks for code from the model repository ('trust_remote_code')"),
    (lambda d: _edit(d, "config.json", model_file="evil.py"),
     "config.json: asks for code from the model repository ('model_file')"),
    (lambda d: _edit(d, "tokenizer_config.json", auto_map={"AutoTokenizer": ["evil.Tok", None]}),
     "tokenizer_config.json: asks for code from the model repository ('auto_map')"),
    (lambda d: _edit(d, "config.json", model_type="../../os"),
     "config.json: 'model_type' must name an architecture, not '../../os'"),
    # a module of mlx_lm.models that is a helper, not an architecture (no Model, ModelArgs)
    (lambda d: _edit(d, "config.json", model_type="ssm"),
     "config.json: model_type 'ssm' is not an architecture mlx-lm "),
    (lambda d: (d / "config.json").write_text('{"model_type": "llama", "model_type": "llama"}'),
     "config.json: duplicate key 'model_type'"),
    (lambda d: (d / "tokenizer.json").unlink(), "tokenizer.json: missing"),
    (lambda d: (d / "model.safetensors").write_bytes(b"\x08" + b"\0" * 7 + b"{}      x"),
     "model.safetensors: "),
    (lambda d: _edit(d, "tokenizer_config.json", chat_template="{% for %}"),
     "tokenizer_config.json (chat_template): the chat template does not parse"),
])
def test_refusals_at_load_name_the_file(tmp_path, change, message):
    from sealbox.worker.engine import ModelError
    from sealbox.worker.llm_engine import LlmEngine

    model = make_tiny_llm(tmp_path / "m")
    change(model)
    with pytest.raises(ModelError) as err:
        LlmEngine.load(sealed_files(model))
    assert str(err.value).startswith(message), str(err.value)


@pytest.mark.parametrize("config, module", [
    ({"model_type": "llama"}, "llama"),
    ({"model_type": "mistral"}, "llama"),                 # mlx-lm's MODEL_REMAPPING
    ({"model_type": "solar_open"}, "solar_open"),         # Model imported from another module still counts
    ({"model_type": "bailing_hybrid", "architectures": ["BailingMoeV3ForCausalLM"]}, "bailing_moe_v3"),
    ({"model_type": "bailing_hybrid", "architectures": ["Other"]}, "bailing_hybrid"),
])
def test_architecture_resolves_as_mlx_lm_does(config, module):
    """The module check_architecture names is the one mlx_lm.utils._get_classes would import."""
    from mlx_lm import utils

    from sealbox.worker.llm_engine import check_architecture
    assert check_architecture(config) == module
    assert utils._get_classes(config)[0].__module__.startswith("mlx_lm.models.")


@pytest.mark.parametrize("model_type", ["ssm", "mla", "cache", "base", "switch_layers", "pipeline", "evil_arch"])
def test_helper_modules_and_unknown_types_are_no_architecture(model_type):
    import mlx_lm

    from sealbox.worker.engine import ModelError
    from sealbox.worker.llm_engine import check_architecture
    with pytest.raises(ModelError) as err:
        check_architecture({"model_type": model_type})
    assert str(err.value) == (f"config.json: model_type {model_type!r} is not an architecture mlx-lm "
                              f"{mlx_lm.__version__} implements natively")


def test_architectures_must_be_names():
    from sealbox.worker.engine import ModelError
    from sealbox.worker.llm_engine import check_architecture
    with pytest.raises(ModelError) as err:
        check_architecture({"model_type": "llama", "architectures": [{"x": 1}]})
    assert str(err.value) == "config.json: 'architectures' must be a list of names, not [{'x': 1}]"


def _edit(directory: pathlib.Path, name: str, **changes) -> None:
    data = json.loads((directory / name).read_text())
    data.update(changes)
    (directory / name).write_text(json.dumps(data))


def test_generation_config_changes_eos(tmp_path, tiny):
    """generation_config.json's eos_token_id wins over config.json's, as in mlx_lm.load."""
    from sealbox.worker.llm_engine import LlmEngine

    first = reference_generate(tiny, PROMPT, 20)
    model = make_tiny_llm(tmp_path / "m")
    (model / "generation_config.json").write_text(json.dumps({"eos_token_id": first[3]}))
    out = LlmEngine.load(sealed_files(model)).infer(_inputs({"max_tokens": 20}))
    assert out["output_ids"].tolist() == first[:first.index(first[3])]


def test_root_daemon_never_imports_mlx_lm_or_transformers():
    code = ("import sys; import sealbox.daemon.main, sealbox.daemon.supervisor, sealbox.daemon.server, "
            "sealbox.client.cli; print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('mlx_lm', 'transformers', 'tokenizers', 'jinja2', 'mlx')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
