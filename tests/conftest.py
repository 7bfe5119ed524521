"""Hypothesis profiles: CI runs a fixed (derandomized) set of examples so that a
green run stays green; local runs explore new examples every time. And the
fixtures several test files share (helpers.py holds the plain functions)."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import settings

settings.register_profile("ci", derandomize=True, print_blob=True)
settings.register_profile("dev", print_blob=True)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    import torch
    from helpers import WORDS  # here, not at the top: every test run loads this file, few need transformers
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    d = tmp_path_factory.mktemp("tiny-llama")
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    fast.save_pretrained(d)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
    )
    LlamaForCausalLM(cfg).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    from helpers import WORDS

    rng = np.random.default_rng(0)
    d = tmp_path_factory.mktemp("data")
    p = d / "data.jsonl"
    with open(p, "w") as f:
        for _ in range(12):
            n = int(rng.integers(3, 9))
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS, n))}) + "\n")
    return p
