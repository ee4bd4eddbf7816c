"""A tiny language model in the mlx-lm layout, made by the tests themselves (issue 14).

A Llama-architecture config with random weights saved by MLX, and a BPE tokenizer trained here with the
`tokenizers` library, written as transformers writes it (tokenizer.json, tokenizer_config.json with a chat
template). Nothing is downloaded.
"""
from __future__ import annotations

import json
import pathlib

TEXT = ("the quick brown fox jumps over the lazy dog. a sandbox keeps the model away from the host. "
        "tokens stream one by one to the client, who may stop reading at any time. ") * 40
VOCAB = 256
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _tokenizer(out: pathlib.Path, chat_template: str | None) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator([TEXT], trainer)
    assert tok.get_vocab_size() <= VOCAB, tok.get_vocab_size()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    if chat_template is not None:
        fast.chat_template = chat_template
    fast.save_pretrained(str(out))


def llama_config(hidden: int = 64, layers: int = 2, heads: int = 4, intermediate: int = 128,
                 vocab: int = VOCAB) -> dict:
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": hidden,
            "num_hidden_layers": layers, "intermediate_size": intermediate, "num_attention_heads": heads,
            "num_key_value_heads": heads, "rms_norm_eps": 1e-5, "vocab_size": vocab,
            "tie_word_embeddings": False, "max_position_embeddings": 2048, "eos_token_id": 2,
            "bos_token_id": 1}


def make_tiny_llm(out: pathlib.Path, *, seed: int = 0, config: dict | None = None,
                  chat_template: str | None = CHAT_TEMPLATE, template_file: bool = False) -> pathlib.Path:
    """Write a random Llama model in the mlx-lm layout to out (created). template_file: the chat template in
    chat_template.jinja (as transformers 5 may save it) instead of tokenizer_config.json."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    out.mkdir(parents=True, exist_ok=True)
    config = config or llama_config()
    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    mx.eval(model.parameters())
    mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (out / "config.json").write_text(json.dumps(config, indent=1))
    _tokenizer(out, None if template_file else chat_template)
    # Where transformers 5 saved the template is its choice: put it exactly where the caller asked.
    tc_path = out / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    tc.pop("chat_template", None)
    (out / "chat_template.jinja").unlink(missing_ok=True)
    if chat_template is not None:
        if template_file:
            (out / "chat_template.jinja").write_text(chat_template)
        else:
            tc["chat_template"] = chat_template
    tc_path.write_text(json.dumps(tc, indent=1))
    return out


def quantize_llm(src: pathlib.Path, out: pathlib.Path, bits: int = 4, group_size: int = 32) -> pathlib.Path:
    """mlx-lm's own conversion of src to quantized weights, in out (must not exist)."""
    from mlx_lm import convert

    convert(str(src), mlx_path=str(out), quantize=True, q_bits=bits, q_group_size=group_size)
    return out


def reference_generate(path: pathlib.Path, prompt: str, max_tokens: int) -> list[int]:
    """Greedy token ids from mlx_lm in-process, as a user would run it (mlx_lm.load + stream_generate)."""
    from mlx_lm import load, stream_generate

    model, tokenizer = load(str(path))
    return [r.token for r in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens)]
