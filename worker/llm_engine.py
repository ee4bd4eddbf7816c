"""The mlx-lm engine: a language model in the mlx-lm layout, generating text (format = "mlx-lm").

The model directory (every file signed) holds config.json, model*.safetensors (optionally with
model.safetensors.index.json), tokenizer.json and tokenizer_config.json, and optionally
generation_config.json (it may change the EOS ids), special_tokens_map.json and chat_template.jinja (where
transformers 5 may put the chat template instead of tokenizer_config.json). Other files are never shown to
the loaders.

Loading, in this order, all inside the sandbox:
1. config.json, generation_config.json and tokenizer_config.json are read as strict JSON (no duplicate keys)
   and refused, with the file named, when they ask for code from the model (`auto_map`, `trust_remote_code`,
   mlx-lm's `model_file`) or name an architecture mlx-lm does not implement itself;
2. every weights file goes through the strict safetensors reader (worker/formats/safetensors.py), and what
   mx.load makes of it is compared with the checked header;
3. mlx-lm loads the model and tokenizer from a private directory in the worker's own tmpfs holding one
   symlink per file to its sealed memfd (/proc/self/fd/N): the loaders want a directory, the symlinks cost
   no memory, and MLX's lazy reads see exactly the verified bytes (a directory of copies would hold the
   weights twice). mlx_lm.load gets that absolute, existing path, never trust_remote_code, with
   HF_HUB_OFFLINE=1 and TRANSFORMERS_OFFLINE=1 (a path that does not exist would be taken for a Hub id).

Requests follow Triton's vLLM backend: `text_input` (BYTES [1]) or `messages` (BYTES [1], a JSON chat list
rendered through the model's chat template by transformers, whose Jinja environment is jinja2's
ImmutableSandboxedEnvironment), optional `stream` (BOOL [1]: pieces through ModelStreamInfer only when true)
and `sampling_parameters` (BYTES [1], JSON:
max_tokens, temperature, top_p, seed, stop). Outputs: `text_output` (BYTES [1]) and, only when asked for,
`output_ids` (INT64 [-1], the generated token ids, EOS excluded; TensorRT-LLM's name).
"""
from __future__ import annotations

import json
import os
import re
import threading
import time
from typing import Iterator, Mapping

import numpy as np

from .engine import Engine, InferenceError, InputError, ModelError, TensorSpec, announce
from .formats import safetensors

CONFIG = "config.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"
# The only files the loaders see (weights: model*.safetensors); anything else in the model is ignored.
LINKED = frozenset({CONFIG, "generation_config.json", "tokenizer.json", TOKENIZER_CONFIG,
                    "special_tokens_map.json", TEMPLATE_FILE, "model.safetensors.index.json"})
WEIGHTS = re.compile(r"model[^/]*\.safetensors")
MAX_JSON_BYTES = 64 << 20          # tokenizer.json of a large vocabulary is tens of MB
REMOTE_CODE_KEYS = ("auto_map", "trust_remote_code", "model_file")
PRIVATE_DIR = "/tmp/model"         # the worker's own tmpfs (TMPDIR); outside a sandbox, a fresh temp dir
SAMPLING_KEYS = ("max_tokens", "temperature", "top_p", "seed", "stop")
MAX_STOP = 16
MAX_REQUEST_TEXT = 1 << 20

# Per-model limits ([models.NAME] in the daemon config), passed by the supervisor in the worker spec.
DEFAULT_LIMITS = {"max_prompt_tokens": 4096, "max_new_tokens": 512, "request_time_s": 120.0}


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _no_duplicates(name: str):
    def hook(pairs):
        seen = {}
        for key, value in pairs:
            if key in seen:
                raise ModelError(f"{name}: duplicate key {key!r}")
            seen[key] = value
        return seen
    return hook


def read_json(files: Mapping[str, str], name: str, required: bool = True):
    if name not in files:
        if required:
            raise ModelError(f"{name}: missing (an mlx-lm model needs {CONFIG}, tokenizer.json, "
                             f"{TOKENIZER_CONFIG} and model*.safetensors)")
        return None
    with open(files[name], "rb") as f:
        raw = f.read(MAX_JSON_BYTES + 1)
    if len(raw) > MAX_JSON_BYTES:
        raise ModelError(f"{name}: larger than {MAX_JSON_BYTES} bytes")
    try:
        value = json.loads(raw, object_pairs_hook=_no_duplicates(name))
    except ValueError as exc:
        raise ModelError(f"{name}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ModelError(f"{name}: must be a JSON object")
    return value


def _refuse_remote_code(name: str, obj: dict) -> None:
    for key in REMOTE_CODE_KEYS:
        if key in obj and obj[key] not in (None, False):
            raise ModelError(f"{name}: asks for code from the model repository ('{key}'); sealbox never runs "
                             "remote code (trust_remote_code)")


def check_architecture(config: dict) -> str:
    """The mlx-lm module that implements config's model_type, or ModelError naming config.json.

    Resolved as mlx_lm.utils._get_classes does (MODEL_ARCHITECTURE_REMAPPING by (model_type, an entry of
    'architectures'), else MODEL_REMAPPING), and the module must define Model and ModelArgs: mlx_lm.models
    also holds helpers (ssm, mla, cache, ...) that are not architectures. Only mlx-lm's own modules are
    imported (the name must be one of theirs)."""
    import importlib
    import pkgutil

    try:
        import mlx_lm
        import mlx_lm.models
        from mlx_lm import utils
    except ImportError as exc:
        raise ModelError(f"format \"mlx-lm\" needs the [llm] extra in the workers' environment "
                         f"(pip install 'sealbox[llm]'): {exc}") from None

    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not re.fullmatch(r"[a-z0-9_]{1,64}", model_type):
        raise ModelError(f"{CONFIG}: 'model_type' must name an architecture, not {model_type!r}")
    architectures = config.get("architectures") or ()
    if isinstance(architectures, str):
        architectures = (architectures,)
    if not isinstance(architectures, (list, tuple)) or not all(isinstance(a, str) for a in architectures):
        raise ModelError(f"{CONFIG}: 'architectures' must be a list of names, not {architectures!r}")
    by_architecture = getattr(utils, "MODEL_ARCHITECTURE_REMAPPING", {})
    module = next((by_architecture[(model_type, a)] for a in architectures if (model_type, a) in by_architecture),
                  None) or utils.MODEL_REMAPPING.get(model_type, model_type)
    native = {m.name for m in pkgutil.iter_modules(mlx_lm.models.__path__)}
    found = None
    if module in native:
        try:
            found = importlib.import_module(f"mlx_lm.models.{module}")
        except Exception:  # noqa: BLE001 - a module of mlx-lm's that does not import is no architecture here
            found = None
    if found is None or not all(isinstance(getattr(found, c, None), type) for c in ("Model", "ModelArgs")):
        raise ModelError(f"{CONFIG}: model_type {model_type!r} is not an architecture mlx-lm "
                         f"{mlx_lm.__version__} implements natively")
    return module


def _check_weights(files: Mapping[str, str]) -> list[str]:
    import mlx.core as mx

    names = sorted(n for n in files if WEIGHTS.fullmatch(n))
    if not names:
        raise ModelError("model*.safetensors: the model has no weights file")
    for name in names:
        announce(f"parsing {name} (safetensors header)")
        header = safetensors.read_file(files[name], name)
        safetensors.check_for_mlx(header, name)
        announce(f"parsing {name} (safetensors, with mx.load)")
        try:
            loaded = mx.load(files[name], format="safetensors")   # lazy: reads the header only
        except Exception as exc:  # noqa: BLE001 - whatever MLX raises, the file is refused with its name
            raise ModelError(f"{name}: MLX refused it after the strict check: {_first_line(exc)}") from None
        safetensors.check_loaded(header, loaded, name)
    return names


def private_directory(files: Mapping[str, str], names: list[str]) -> str:
    """The loaders' view of the model: symlinks to the sealed memfds, in the worker's own tmpfs."""
    import tempfile

    path = PRIVATE_DIR if os.environ.get("TMPDIR") == "/tmp" and not os.path.exists(PRIVATE_DIR) \
        else tempfile.mkdtemp(prefix="sealbox-llm-")
    os.makedirs(path, mode=0o700, exist_ok=True)
    for name in names:
        os.symlink(files[name], os.path.join(path, name))
    return path


def _template_source(files: Mapping[str, str], tokenizer_config: dict) -> str | None:
    """Where the chat template lives: the file a refusal names."""
    if TEMPLATE_FILE in files:
        return TEMPLATE_FILE
    if tokenizer_config.get("chat_template") is not None:
        return f"{TOKENIZER_CONFIG} (chat_template)"
    return None


class LlmEngine(Engine):
    platform = "mlx-lm"
    inputs = (TensorSpec("text_input", "BYTES", (1,)), TensorSpec("messages", "BYTES", (1,)),
              TensorSpec("stream", "BOOL", (1,)), TensorSpec("sampling_parameters", "BYTES", (1,)))
    outputs = (TensorSpec("text_output", "BYTES", (1,)), TensorSpec("output_ids", "INT64", (-1,)))
    default_outputs = ("text_output",)

    def __init__(self, model, tokenizer, limits: dict, template: str | None):
        self.model, self.tokenizer, self.limits, self.template = model, tokenizer, limits, template

    @classmethod
    def load(cls, files: Mapping[str, str], **limits) -> "LlmEngine":
        unknown = set(limits) - set(DEFAULT_LIMITS)
        if unknown:
            raise ModelError(f"unknown mlx-lm limits {sorted(unknown)}")
        limits = {**DEFAULT_LIMITS, **limits}
        announce(f"parsing {CONFIG}, generation_config.json, {TOKENIZER_CONFIG} (strict JSON)")
        config = read_json(files, CONFIG)
        tokenizer_config = read_json(files, TOKENIZER_CONFIG)
        generation = read_json(files, "generation_config.json", required=False)
        for name, obj in ((CONFIG, config), (TOKENIZER_CONFIG, tokenizer_config),
                          ("generation_config.json", generation or {})):
            _refuse_remote_code(name, obj)
        if "tokenizer.json" not in files:
            raise ModelError("tokenizer.json: missing (sealbox loads fast tokenizers only)")
        announce(f"importing mlx_lm for the {CONFIG} architecture check")
        check_architecture(config)
        weights = _check_weights(files)
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["TRANSFORMERS_OFFLINE"] = "1"
        path = private_directory(files, sorted(set(files) & LINKED) + weights)
        announce("loading the model and tokenizer with mlx_lm.load")
        from mlx_lm import load
        try:
            model, tokenizer = load(os.path.abspath(path))
        except Exception as exc:  # noqa: BLE001 - mlx-lm and transformers raise anything; the load is refused
            raise ModelError(f"mlx_lm.load refused the model: {type(exc).__name__}: {_first_line(exc)}") from None
        engine = cls(model, tokenizer, limits, _template_source(files, tokenizer_config))
        if engine.template is not None:
            announce(f"compiling the chat template ({engine.template})")
            engine._compile_template()
        return engine

    def _compile_template(self) -> None:
        """A template that does not even parse refuses the model (the load timeout covers this)."""
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        try:
            ImmutableSandboxedEnvironment().parse(self.tokenizer.chat_template)
        except jinja2.TemplateError as exc:
            raise ModelError(f"{self.template}: the chat template does not parse: {_first_line(exc)}") from None

    # --- requests --------------------------------------------------------------------------------------------

    def check_inputs(self, inputs: Mapping[str, np.ndarray]) -> None:
        """text_input or messages (exactly one); stream and sampling_parameters optional."""
        known = {spec.name: spec for spec in self.inputs}
        unknown = sorted(set(inputs) - set(known))
        if unknown:
            raise InputError(f"inputs {unknown} do not exist (inputs: {sorted(known)})")
        if ("text_input" in inputs) == ("messages" in inputs):
            raise InputError("give exactly one of the inputs 'text_input' and 'messages'")
        for name, array in inputs.items():
            known[name].check(array)

    def _text(self, inputs, name: str) -> str | None:
        if name not in inputs:
            return None
        value = inputs[name].reshape(-1)[0]
        if len(value) > MAX_REQUEST_TEXT:
            raise InputError(f"input '{name}': longer than {MAX_REQUEST_TEXT} bytes")
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise InputError(f"input '{name}': not UTF-8") from None

    def _sampling(self, inputs) -> dict:
        text = self._text(inputs, "sampling_parameters")
        try:
            params = json.loads(text) if text else {}
        except ValueError as exc:
            raise InputError(f"input 'sampling_parameters': not JSON ({exc})") from None
        if not isinstance(params, dict):
            raise InputError("input 'sampling_parameters': must be a JSON object")
        unknown = sorted(set(params) - set(SAMPLING_KEYS))
        if unknown:
            raise InputError(f"input 'sampling_parameters': unknown keys {unknown} (known: {list(SAMPLING_KEYS)})")
        limit = int(self.limits["max_new_tokens"])
        out = {"max_tokens": params.get("max_tokens", limit), "temperature": params.get("temperature", 0.0),
               "top_p": params.get("top_p", 1.0), "seed": params.get("seed"), "stop": params.get("stop", [])}

        def number(key, lo, hi, kind=(int, float)):
            v = out[key]
            if isinstance(v, bool) or not isinstance(v, kind) or not lo <= v <= hi:
                raise InputError(f"input 'sampling_parameters': '{key}' must be a number in [{lo}, {hi}], not {v!r}")
        number("max_tokens", 1, limit, int)
        number("temperature", 0.0, 100.0)
        number("top_p", 0.0, 1.0)
        if out["seed"] is not None:
            number("seed", 0, 2**63 - 1, int)
        stop = out["stop"]
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
            raise InputError(f"input 'sampling_parameters': 'stop' must be a string or a list of at most "
                             f"{MAX_STOP} non-empty strings")
        out["stop"] = stop
        return out

    def _prompt(self, inputs) -> list[int]:
        text = self._text(inputs, "text_input")
        if text is not None:
            bos = self.tokenizer.bos_token
            ids = self.tokenizer.encode(text, add_special_tokens=bos is None or not text.startswith(bos))
        else:
            ids = self._chat(self._text(inputs, "messages"))
        if len(ids) > self.limits["max_prompt_tokens"]:
            raise InputError(f"the prompt is {len(ids)} tokens long, this model takes at most "
                             f"{int(self.limits['max_prompt_tokens'])}")
        if not ids:
            raise InputError("the prompt is empty")
        return list(ids)

    def _chat(self, text: str) -> list[int]:
        try:
            messages = json.loads(text)
        except ValueError as exc:
            raise InputError(f"input 'messages': not JSON ({exc})") from None
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and set(m) == {"role", "content"} and isinstance(m["role"], str)
                and isinstance(m["content"], str) for m in messages):
            raise InputError("input 'messages': must be a non-empty JSON list of {\"role\": str, \"content\": str}")
        if self.template is None:
            raise InputError("input 'messages': this model has no chat template; send 'text_input'")
        import jinja2
        try:
            rendered = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except jinja2.exceptions.SecurityError as exc:
            raise InputError(f"{self.template}: the chat template was stopped by the Jinja sandbox: "
                             f"{_first_line(exc)}") from None
        except jinja2.TemplateError as exc:
            raise InputError(f"{self.template}: rendering the chat template failed: {_first_line(exc)}") from None
        if not isinstance(rendered, str):
            raise InferenceError("the chat template did not render to text")
        return self.tokenizer.encode(rendered, add_special_tokens=False)

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The whole generation as one response."""
        return next(self.responses(inputs, streaming=False, cancelled=threading.Event()))

    def responses(self, inputs, *, streaming: bool, cancelled: threading.Event) -> Iterator[dict]:
        """One response per generated piece of text when the call is a stream and its `stream` input is true
        (as Triton's vLLM backend: without it, one response), else one; stops when cancelled is set, at
        max_tokens, at EOS, at a stop string, or when the per-request time budget is spent."""
        params = self._sampling(inputs)
        prompt = self._prompt(inputs)
        pieces = self._generate(prompt, params, cancelled)
        if streaming and "stream" in inputs and bool(inputs["stream"].reshape(-1)[0]):
            yield from pieces
            return
        text, ids = [], []
        for piece in pieces:
            text.append(piece["text_output"][0])
            ids.append(piece["output_ids"])
        yield {"text_output": np.array([b"".join(text)], dtype=object),
               "output_ids": np.concatenate(ids) if ids else np.zeros(0, np.int64)}

    def _generate(self, prompt: list[int], params: dict, cancelled: threading.Event) -> Iterator[dict]:
        import mlx.core as mx
        from mlx_lm import stream_generate
        from mlx_lm.sample_utils import make_sampler

        if params["seed"] is not None:
            mx.random.seed(params["seed"])
        sampler = make_sampler(temp=params["temperature"], top_p=params["top_p"] if params["top_p"] < 1 else 0.0)
        deadline = time.monotonic() + float(self.limits["request_time_s"])
        stops = params["stop"]
        hold = max((len(s) for s in stops), default=1) - 1   # characters that may begin a stop string
        text, sent, ids = "", 0, []

        def piece(upto: int) -> dict:
            nonlocal sent, ids
            out = {"text_output": np.array([text[sent:upto].encode("utf-8")], dtype=object),
                   "output_ids": np.array(ids, dtype=np.int64)}
            sent, ids = upto, []
            return out

        try:
            for response in stream_generate(self.model, self.tokenizer, mx.array(prompt),
                                            max_tokens=params["max_tokens"], sampler=sampler):
                if response.finish_reason != "stop":   # "stop": the EOS token, never part of the output
                    ids.append(response.token)
                text += response.text
                found = [i for i in (text.find(s, max(0, sent - hold)) for s in stops) if i >= 0]
                if found:
                    yield piece(min(found))
                    return
                if cancelled.is_set():   # nobody reads the rest
                    return
                if time.monotonic() > deadline:   # the budget is spent: send what there is
                    break
                safe = len(text) - hold
                if safe > sent:   # a token whose text is still incomplete (part of a UTF-8 character) waits
                    yield piece(safe)
        except (ValueError, RuntimeError) as exc:   # MLX's own errors: one clean line
            raise InferenceError(f"generation failed: {_first_line(exc)}") from exc
        if len(text) > sent or ids:
            yield piece(len(text))
