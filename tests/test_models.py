"""Tests for jumplora.models: families on tiny offline models, detection and loading."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

from jumplora.models import (
    MODEL_FAMILIES,
    CausalFamily,
    EncoderRankingFamily,
    LoadedModel,
    ModelLoadError,
    PromptExample,
    Seq2SeqFamily,
    default_target_modules,
    detect_family,
    exact_match,
    load_model,
)

WORDS_POS = ["great", "wonderful", "excellent", "lovely"]
WORDS_NEG = ["awful", "terrible", "horrible", "boring"]


def _prompt(text: str, options: tuple[str, ...]) -> str:
    opts = " | ".join(options)
    return f"Task Instruction: Is the review positive?\nOptions: {opts}\nText: a {text} film\nAnswer:"


def toy_examples(options: tuple[str, str] = ("yes", "no")) -> list[PromptExample]:
    """8 examples, answer options[0] for positive words, options[1] for negative ones."""
    out = []
    for pos, neg in zip(WORDS_POS, WORDS_NEG, strict=True):
        out.append(PromptExample(_prompt(pos, options), options[0], options))
        out.append(PromptExample(_prompt(neg, options), options[1], options))
    return out


def train(family, model, examples, steps: int, lr: float) -> tuple[float, float]:
    """Full-batch Adam; returns (first loss, last loss)."""
    batch = family.collate(family.encode(examples))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = family.loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses[0], losses[-1]


# -- base ---------------------------------------------------------------------------------------
def test_exact_match_normalises():
    assert exact_match("  Yes \n", "yes")
    assert exact_match("very   Positive", "very positive")
    assert not exact_match("yes.", "yes")


def test_prompt_example_tuple_and_nonempty():
    ex = PromptExample("p", "a", ["a", "b"])  # type: ignore[arg-type]
    assert ex.candidates == ("a", "b")
    hash(ex)
    with pytest.raises(ValueError):
        PromptExample("p", "a", ())


# -- loading ------------------------------------------------------------------------------------
def test_packaged_minilm_loads_offline():
    loaded = load_model(None)
    assert isinstance(loaded, LoadedModel)
    assert loaded.family_name == "encoder"
    assert isinstance(loaded.family, EncoderRankingFamily)
    assert loaded.target_modules == ["query", "value"]
    fam, model = loaded.family, loaded.model
    examples = toy_examples(("positive", "negative"))[:4]
    batch = fam.collate(fam.encode(examples))
    loss = fam.loss(model, batch)
    assert loss.ndim == 0 and torch.isfinite(loss)
    preds = fam.predict(model.eval(), batch)
    assert all(p in ex.candidates for p, ex in zip(preds, examples, strict=True))


def test_detect_family(tiny_bert_config, tiny_t5_config, tiny_llama_config, tiny_gpt2_config):
    assert detect_family(tiny_bert_config) == "encoder"
    assert detect_family(tiny_t5_config) == "seq2seq"
    assert detect_family(tiny_llama_config) == "causal"
    assert detect_family(tiny_gpt2_config) == "causal"
    assert detect_family(tiny_llama_config, "encoder") == "encoder"
    with pytest.raises(ValueError, match="unknown model family"):
        detect_family(tiny_bert_config, "nope")
    assert set(MODEL_FAMILIES) == {"encoder", "seq2seq", "causal"}


def test_default_target_modules(tiny_bert_config, tiny_t5_config, tiny_llama_config, tiny_gpt2_config):
    assert default_target_modules(tiny_bert_config, "encoder") == ["query", "value"]
    assert default_target_modules(tiny_t5_config, "seq2seq") == ["q", "v"]
    assert default_target_modules(tiny_llama_config, "causal") == ["q_proj", "v_proj"]
    assert default_target_modules(tiny_gpt2_config, "causal") == ["c_attn"]
    tiny_llama_config.model_type = "unheard-of"  # instance attribute: per-family fallback
    assert default_target_modules(tiny_llama_config, "causal") == ["q_proj", "v_proj"]


def test_load_model_rejects_non_model_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelLoadError, match=str(tmp_path)):
        load_model(tmp_path)
    missing = tmp_path / "does-not-exist"
    with pytest.raises(ModelLoadError, match="does-not-exist"):
        load_model(missing)
    assert issubclass(ModelLoadError, ValueError)
    with pytest.raises(ValueError, match="unknown model family"):
        load_model(None, "nope")


def test_load_model_broken_folder_names_path(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ModelLoadError, match=str(tmp_path)):
        load_model(tmp_path)


@pytest.mark.parametrize(
    ("fixture", "family_cls", "tok"),
    [
        ("tiny_bert", EncoderRankingFamily, "bert_tokenizer"),
        ("tiny_t5", Seq2SeqFamily, "gen_tokenizer"),
        ("tiny_llama", CausalFamily, "gen_tokenizer"),
    ],
)
def test_save_and_load_roundtrip(request, tmp_path: Path, fixture, family_cls, tok):
    model = request.getfixturevalue(fixture)
    tokenizer = request.getfixturevalue(tok)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = load_model(tmp_path, max_length=64, rank_options=True)
    assert isinstance(loaded.family, family_cls)
    assert loaded.family.max_length == 64
    assert loaded.path == tmp_path
    for (name, a), b in zip(model.state_dict().items(), loaded.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    batch = loaded.family.collate(loaded.family.encode(toy_examples()[:2]))
    assert torch.isfinite(loaded.family.loss(loaded.model, batch))
    assert all(p in ("yes", "no") for p in loaded.family.predict(loaded.model.eval(), batch))


# -- encoder ------------------------------------------------------------------------------------
def test_encoder_loss_falls(tiny_bert, bert_tokenizer):
    fam = EncoderRankingFamily(bert_tokenizer)
    first, last = train(fam, tiny_bert, toy_examples(("positive", "negative")), steps=40, lr=1e-3)
    assert math.isfinite(first) and last < 0.5 * first


def test_encoder_candidates_encoded_once_and_masked(tiny_bert, bert_tokenizer):
    fam = EncoderRankingFamily(bert_tokenizer)
    examples = [
        PromptExample("Is it good?\nAnswer:", "yes", ("yes", "no")),
        PromptExample("Which colour?\nAnswer:", "red", ("red", "green", "blue")),
        PromptExample("Is it bad?\nAnswer:", "no", ("no", "yes")),
    ]
    batch = fam.collate(fam.encode(examples))
    assert batch["candidate_texts"] == ["yes", "no", "red", "green", "blue"]
    assert batch["labels"].tolist() == [0, 2, 1]
    rows = []
    handle = tiny_bert.register_forward_hook(
        lambda m, a, kw, out: rows.append(kw["input_ids"].shape[0]), with_kwargs=True
    )
    scores = fam.scores(tiny_bert.eval(), batch)
    handle.remove()
    assert rows == [3, 5]  # one pass over prompts, one over the 5 distinct candidates
    assert torch.isinf(scores[0, 2:]).all() and torch.isfinite(scores[0, :2]).all()
    assert torch.isinf(scores[1, :2]).all() and torch.isfinite(scores[1, 2:]).all()
    preds = fam.predict(tiny_bert, batch)
    assert all(p in ex.candidates for p, ex in zip(preds, examples, strict=True))
    loss = fam.loss(tiny_bert, batch)
    assert torch.isfinite(loss)
    loss.backward()


def test_encoder_eval_cache(tiny_bert, bert_tokenizer):
    fam = EncoderRankingFamily(bert_tokenizer)
    model = tiny_bert.eval()
    examples = toy_examples(("positive", "negative"))
    batches = [fam.collate(fam.encode(examples[i : i + 3])) for i in range(0, 8, 3)]
    plain = [fam.predict(model, b) for b in batches]
    plain_scores = [fam.scores(model, b) for b in batches]
    rows: list[int] = []
    handle = model.register_forward_hook(lambda m, a, kw, out: rows.append(kw["input_ids"].shape[0]), with_kwargs=True)
    with fam.eval_cache(model):
        cached = [fam.predict(model, b) for b in batches]
        cached_scores = [fam.scores(model, b) for b in batches]
    handle.remove()
    assert cached == plain
    for a, b in zip(plain_scores, cached_scores, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # Candidates embedded once (first batch), afterwards only the prompts are run.
    assert rows == [3, 2, 3, 2, 3, 3, 2]
    assert fam._cache is None  # nothing cached outside the context


# -- seq2seq ------------------------------------------------------------------------------------
def test_seq2seq_labels_are_answer_tokens(gen_tokenizer):
    fam = Seq2SeqFamily(gen_tokenizer)
    examples = [
        PromptExample("Is it good?\nAnswer:", "yes", ("yes", "no")),
        PromptExample("Say it.\nAnswer:", "very positive", ("very positive", "no")),
    ]
    feats = fam.encode(examples)
    batch = fam.collate(feats)
    labels = batch["labels"]
    assert labels.shape == (2, 3)
    assert labels[0, 2].item() == -100  # padding of the shorter answer is ignored
    for row, ex in zip(labels, examples, strict=True):
        ids = row[row != -100].tolist()
        assert ids[-1] == gen_tokenizer.eos_token_id
        assert gen_tokenizer.decode(ids[:-1]) == ex.answer
    assert batch["attention_mask"].sum(-1).tolist() == [len(f["input_ids"]) for f in feats]


def test_seq2seq_trains_generates_and_ranks(tiny_t5, gen_tokenizer):
    fam = Seq2SeqFamily(gen_tokenizer, max_answer_length=4)
    examples = toy_examples()
    first, last = train(fam, tiny_t5, examples, steps=40, lr=3e-3)
    assert last < 0.5 * first
    batch = fam.collate(fam.encode(examples))
    preds = fam.predict(tiny_t5, batch)
    assert len(preds) == 8 and all(isinstance(p, str) for p in preds)
    acc = sum(exact_match(p, ex.answer) for p, ex in zip(preds, examples, strict=True)) / len(examples)
    assert 0.0 <= acc <= 1.0
    ranker = Seq2SeqFamily(gen_tokenizer, max_answer_length=4, rank_options=True)
    rbatch = ranker.collate(ranker.encode(examples))
    ranked = ranker.predict(tiny_t5, rbatch)
    assert all(p in ex.candidates for p, ex in zip(ranked, examples, strict=True))


@pytest.mark.parametrize(("family_cls", "model_fixture"), [(Seq2SeqFamily, "tiny_t5"), (CausalFamily, "tiny_llama")])
def test_rank_scores_match_loss(family_cls, model_fixture, gen_tokenizer, request):
    """Candidate log-likelihood equals -(mean answer loss) * answer tokens, prompt by prompt (for the
    causal family: left-padded ranking with positions/logits_to_keep agrees with the right-padded loss)."""
    fam = family_cls(gen_tokenizer, rank_options=True, rank_batch_size=3)
    examples = [
        PromptExample("Is it good?\nAnswer:", "yes", ("yes", "no way")),
        PromptExample("A much longer prompt, to force padding here.\nAnswer:", "no way", ("yes", "no way")),
    ]
    model = request.getfixturevalue(model_fixture).eval()
    scores = fam.candidate_log_likelihoods(model, fam.collate(fam.encode(examples)))
    for ex, s in zip(examples, scores, strict=True):
        for j, cand in enumerate(ex.candidates):
            single = fam.collate(fam.encode([PromptExample(ex.prompt, cand, ex.candidates)]))
            n = int((single["labels"] != -100).sum())
            with torch.no_grad():
                expected = -fam.loss(model, single).item() * n
            assert s[j].item() == pytest.approx(expected, abs=1e-3)


# -- causal -------------------------------------------------------------------------------------
def test_causal_labels_mask_prompt(gen_tokenizer):
    fam = CausalFamily(gen_tokenizer)
    examples = [
        PromptExample("Is it good?\nAnswer:", "yes", ("yes", "no")),
        PromptExample("A longer prompt here.\nAnswer:", "very positive", ("very positive",)),
    ]
    feats = fam.encode(examples)
    batch = fam.collate(feats)
    for i, (f, ex) in enumerate(zip(feats, examples, strict=True)):
        labels = batch["labels"][i]
        n = len(f["input_ids"])
        assert (labels[: f["prompt_length"]] == -100).all()
        assert (labels[n:] == -100).all()  # right padding
        answer = labels[f["prompt_length"] : n]
        assert torch.equal(answer, batch["input_ids"][i, f["prompt_length"] : n])
        assert answer[-1].item() == gen_tokenizer.eos_token_id
        assert gen_tokenizer.decode(answer[:-1].tolist()) == ex.answer
        # Generation prompts are left-padded copies of the prompt tokens.
        prompt = batch["prompt_input_ids"][i][batch["prompt_attention_mask"][i].bool()]
        assert prompt.tolist() == f["input_ids"][: f["prompt_length"]]
    assert batch["prompt_attention_mask"][:, -1].all()


def test_causal_truncation_keeps_answer(gen_tokenizer):
    fam = CausalFamily(gen_tokenizer, max_length=24, max_answer_length=4)
    long = PromptExample("word " * 100 + "\nAnswer:", "yes", ("yes", "no"))
    (f,) = fam.encode([long])
    assert len(f["input_ids"]) <= 24
    assert gen_tokenizer.decode(f["input_ids"][f["prompt_length"] - 3 : f["prompt_length"]]).startswith("answer")


def test_causal_sets_pad_token(minilm_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_path, local_files_only=True, eos_token="[SEP]")
    tok.pad_token = None
    assert tok.pad_token_id is None
    CausalFamily(tok)
    assert tok.pad_token_id == tok.eos_token_id


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_causal_trains_generates_and_ranks(request, fixture, gen_tokenizer):
    model = request.getfixturevalue(fixture)
    fam = CausalFamily(gen_tokenizer, max_answer_length=4)
    examples = toy_examples()
    first, last = train(fam, model, examples, steps=40, lr=3e-3)
    assert last < 0.5 * first
    batch = fam.collate(fam.encode(examples))
    preds = fam.predict(model, batch)
    assert len(preds) == 8 and all(isinstance(p, str) and "\n" not in p for p in preds)
    acc = sum(exact_match(p, ex.answer) for p, ex in zip(preds, examples, strict=True)) / len(examples)
    assert 0.0 <= acc <= 1.0
    ranker = CausalFamily(gen_tokenizer, max_answer_length=4, rank_options=True)
    ranked = ranker.predict(model, ranker.collate(ranker.encode(examples)))
    assert all(p in ex.candidates for p, ex in zip(ranked, examples, strict=True))


# -- PEFT-wrapped models ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fixture", "family_cls", "tok", "task_type"),
    [
        ("tiny_bert", EncoderRankingFamily, "bert_tokenizer", None),
        ("tiny_t5", Seq2SeqFamily, "gen_tokenizer", "SEQ_2_SEQ_LM"),
        ("tiny_llama", CausalFamily, "gen_tokenizer", "CAUSAL_LM"),
    ],
)
@pytest.mark.parametrize("rank", [False, True])
def test_families_work_on_peft_models(request, fixture, family_cls, tok, task_type, rank):
    model = request.getfixturevalue(fixture)
    tokenizer = request.getfixturevalue(tok)
    targets = default_target_modules(model.config, family_cls.name)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=targets, task_type=task_type))
    fam = family_cls(tokenizer) if family_cls is EncoderRankingFamily else family_cls(tokenizer, rank_options=rank)
    examples = toy_examples()[:3]
    batch = fam.collate(fam.encode(examples))
    peft_model.train()
    fam.loss(peft_model, batch).backward()
    lora_grads = [p.grad for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert lora_grads and all(g is not None for g in lora_grads)
    peft_model.eval()
    with fam.eval_cache(peft_model):
        preds = fam.predict(peft_model, batch)
    assert len(preds) == 3 and all(isinstance(p, str) for p in preds)
    if rank or family_cls is EncoderRankingFamily:
        assert all(p in ex.candidates for p, ex in zip(preds, examples, strict=True))


# -- greedy generation and the two metrics ------------------------------------------------------
def _task_prompts(texts: list[str], options: tuple[str, ...]) -> list[PromptExample]:
    head = f"Task Instruction: Pick one.\nOptions: {' | '.join(options)}\n"
    return [PromptExample(f"{head}Text: {t}\nAnswer:", options[0], options) for t in texts]


def _captured_rows(fam, model, batch) -> list[list[int]]:
    rows: list[list[int]] = []
    original = fam.decode_answers
    fam.decode_answers = lambda r: rows.extend(r) or original(r)
    fam.generate(model, batch)
    fam.decode_answers = original
    return rows


def _cut_at_stop(row: list[int], stop: frozenset[int]) -> list[int]:
    for i, tok in enumerate(row):
        if tok in stop:
            return row[: i + 1]
    return row


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_t5"])
def test_generate_equals_hf_greedy(request, fixture, gen_tokenizer):
    """Our KV-cache loop (shared-prefix prefill for causal LMs) gives model.generate's greedy tokens,
    left padding included, up to each row's first stop token."""
    model = request.getfixturevalue(fixture).eval()
    fam = (CausalFamily if fixture == "tiny_llama" else Seq2SeqFamily)(gen_tokenizer, max_answer_length=8)
    options = ("alpha beta gamma delta epsilon", "no")
    examples = _task_prompts(["short", "a somewhat longer input text here", "mid length one"], options)
    batch = fam.collate(fam.encode(examples))
    n = fam.max_new_tokens(batch)
    assert n == len(gen_tokenizer(options[0], add_special_tokens=False)["input_ids"]) == 5
    ours = _captured_rows(fam, model, batch)
    if fixture == "tiny_llama":
        ids, mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
        assert not mask.all()  # left padding is exercised
        hf = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False)[:, ids.shape[1] :]
    else:
        hf = model.generate(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=n, do_sample=False
        )[:, 1:]  # drop the decoder start token
    expected = [_cut_at_stop(row, fam.stop_ids()) for row in hf.tolist()]
    assert ours == expected
    assert max(len(r) for r in ours) > 1
    assert fam.generate(model, batch) == fam.decode_answers(expected)


def test_greedy_stops_when_every_row_has_ended(gen_tokenizer):
    """Rows stop at eos or a newline token; finished rows are fed pad; no step after the last row ends."""
    fam = CausalFamily(gen_tokenizer)
    fam._newline_ids = frozenset({7})
    eos, vocab = gen_tokenizer.eos_token_id, 200
    script = [[5, 7, 9], [eos, 3, 3], [6, 8, eos]]  # row i emits script[i][t] at step t
    fed: list[list[int]] = []

    def logits_for(t: int) -> torch.Tensor:
        return torch.nn.functional.one_hot(torch.tensor([s[t] for s in script]), vocab).float()

    def step(tokens: torch.Tensor) -> torch.Tensor:
        fed.append(tokens.tolist())
        return logits_for(len(fed))

    rows = fam.greedy(logits_for(0), step, max_new=10)
    assert rows == [[5, 7], [eos], [6, 8, eos]]
    assert fed == [[5, fam._pad_id, 6], [fam._pad_id, fam._pad_id, 8]]
    assert fam.decode_answers([[*gen_tokenizer("hello world", add_special_tokens=False)["input_ids"], eos]]) == [
        "hello world"
    ]


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_causal_loss_on_answer_positions_equals_full_loss(request, fixture, gen_tokenizer):
    """The LM head runs only where an answer token is predicted; the loss is HF's full-logits loss."""
    model = request.getfixturevalue(fixture).eval()
    fam = CausalFamily(gen_tokenizer)
    examples = _task_prompts(["short", "a much longer input text than the others"], ("yes", "no way at all"))
    examples.append(PromptExample(examples[1].prompt, "no way at all", examples[1].candidates))
    batch = fam.collate(fam.encode(examples))
    seen: list[torch.Tensor] = []
    handle = model.lm_head.register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        ours = fam.loss(model, batch)
    handle.remove()
    with torch.no_grad():
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    assert ours.item() == pytest.approx(full.item(), rel=1e-5)
    assert seen[0].shape[1] < batch["input_ids"].shape[1] // 2


@pytest.mark.parametrize(("family_cls", "fixture"), [(CausalFamily, "tiny_llama"), (Seq2SeqFamily, "tiny_t5")])
def test_predict_both_modes(request, family_cls, fixture, gen_tokenizer):
    model = request.getfixturevalue(fixture).eval()
    fam = family_cls(gen_tokenizer)  # ranking is available without rank_options
    examples = toy_examples()[:3]
    batch = fam.collate(fam.encode(examples))
    both = fam.predict_both(model, batch)
    assert set(both) == {"generate", "rank"}
    assert both["generate"] == fam.predict(model, batch) == fam.predict(model, batch, mode="generate")
    assert both["rank"] == fam.predict(model, batch, mode="rank")
    assert all(p in ex.candidates for p, ex in zip(both["rank"], examples, strict=True))
    with pytest.raises(ValueError, match="unknown predict mode"):
        fam.predict(model, batch, mode="beam")


def test_causal_chat_template_prompt(gen_tokenizer, tiny_llama):
    """With a chat template the prompt is the user turn and the answer the assistant's text (no leading space)."""
    import copy

    tok = copy.deepcopy(gen_tokenizer)
    tok.chat_template = (
        "{% for m in messages %}[{{ m['content'] }}]{% endfor %}{% if add_generation_prompt %}>{% endif %}"
    )
    fam = CausalFamily(tok)
    assert fam.chat_template
    (f,) = fam.encode([PromptExample("Is it good?\nAnswer:", "yes", ("yes", "no"))])
    prompt = tok.decode(f["input_ids"][: f["prompt_length"]])
    assert prompt.startswith("[ is it good?") and prompt.endswith(">")
    assert tok.decode(f["input_ids"][f["prompt_length"] :]) == "yes [SEP]"
    assert not CausalFamily(tok, chat_template=False).chat_template
    with pytest.raises(ValueError, match="no chat template"):
        CausalFamily(gen_tokenizer, chat_template=True)


def test_prepare_model_sets_pad_token(tiny_llama, gen_tokenizer):
    tiny_llama.config.pad_token_id = None
    tiny_llama.generation_config.pad_token_id = None
    CausalFamily(gen_tokenizer).prepare_model(tiny_llama)
    assert tiny_llama.config.pad_token_id == tiny_llama.generation_config.pad_token_id == gen_tokenizer.pad_token_id


def _tiny_decoder(kind: str, request) -> torch.nn.Module:
    """Tiny random decoders of the architectures users bring (GQA included, as in SmolLM2)."""
    if kind in ("tiny_llama", "tiny_gpt2"):
        return request.getfixturevalue(kind)
    from transformers import (
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    llama = request.getfixturevalue("tiny_llama_config")  # same vocabulary and special tokens
    common = {
        "vocab_size": llama.vocab_size,
        "pad_token_id": llama.pad_token_id,
        "eos_token_id": llama.eos_token_id,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "max_position_embeddings": 256,
    }
    torch.manual_seed(0)
    if kind == "llama_gqa":
        return LlamaForCausalLM(LlamaConfig(**common, num_attention_heads=4, num_key_value_heads=1))
    if kind == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common, num_attention_heads=2, num_key_value_heads=1))
    return GPTNeoXForCausalLM(GPTNeoXConfig(**common, num_attention_heads=2))


@pytest.mark.parametrize("kind", ["tiny_llama", "tiny_gpt2", "llama_gqa", "qwen2", "gpt_neox"])
def test_ranking_from_the_prefill_equals_full_sequences(request, kind, gen_tokenizer):
    """Candidates packed under a tree mask on the prompts' cache score as when each prompt + candidate
    runs in full (shared prefix, left padding, candidates of 1-5 tokens, an empty one, prompts split
    over chunks); the cache stays usable for generation afterwards."""
    model = _tiny_decoder(kind, request).eval()
    fam = CausalFamily(gen_tokenizer, max_answer_length=8, rank_batch_size=2)
    options = ("alpha beta gamma delta epsilon", "no", "", "yes indeed")
    examples = _task_prompts(["short", "a somewhat longer input text here", "mid length one"], options)
    batch = fam.collate(fam.encode(examples))
    cached = fam.candidate_log_likelihoods(model, batch)
    assert fam._packed_ranking == {type(model): True}  # the packed path ran and passed its own check
    full = fam._score_full_sequences(model, batch)
    assert len(cached) == len(full) == 3
    for ours, reference in zip(cached, full, strict=True):
        assert torch.allclose(ours, reference, atol=1e-4)
    both = fam.predict_both(model, batch)
    assert both["generate"] == fam.generate(model, batch)
    assert both["rank"] == [ex.candidates[int(s.argmax())] for ex, s in zip(examples, full, strict=True)]


def test_ranking_falls_back_when_the_model_ignores_the_tree_mask(tiny_llama, gen_tokenizer, monkeypatch):
    """An architecture whose packed scores disagree with the per-candidate path is ranked per candidate,
    with a warning, from then on."""
    fam = CausalFamily(gen_tokenizer, max_answer_length=8)
    batch = fam.collate(fam.encode(_task_prompts(["short", "longer input"], ("no", "yes indeed"))))
    monkeypatch.setattr(fam, "_score_packed", lambda *a: [torch.zeros(2), torch.zeros(2)])
    with pytest.warns(UserWarning, match="ignores custom attention masks"):
        scores = fam.candidate_log_likelihoods(tiny_llama.eval(), batch)
    assert fam._packed_ranking == {type(tiny_llama): False}
    reference = fam._score_full_sequences(tiny_llama, batch)
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(scores, reference, strict=True))
    again = fam.candidate_log_likelihoods(tiny_llama, batch)  # no second check, no warning
    assert all(torch.allclose(a, b) for a, b in zip(again, scores, strict=True))
