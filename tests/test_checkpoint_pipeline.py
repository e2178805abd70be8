"""transformers pipelines on loaded checkpoints give what the in-memory sparsified model gives."""

import pytest
import torch
from transformers import pipeline

from sparseflow.convert.checkpoint import from_pretrained, save_pretrained
from tests.ckpt_helpers import sparsify, tiny, tokenizer
from tests.conftest import needs_cuda

DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]


def _saved(tmp_path, arch):
    model = sparsify(tiny(arch))
    path = tmp_path / arch
    tokenizer(path)  # the tokenizer is there first: saving the model must leave it untouched
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    save_pretrained(model, path)
    assert all((path / name).read_bytes() == data for name, data in before.items())
    return model, path


@pytest.mark.parametrize("device", DEVICES)
def test_text_generation(tmp_path, device):
    model, path = _saved(tmp_path, "llama")
    kwargs = {"max_new_tokens": 8, "do_sample": False, "return_full_text": False}
    # device= pins the reference: on a GPU host a pipeline would otherwise move it to the GPU
    ref = pipeline("text-generation", model=model.to(device), tokenizer=str(path), device=torch.device(device))
    got = pipeline("text-generation", model=from_pretrained(path, device_map=device), tokenizer=str(path))
    for prompt in ("the cat sat on", "a big red dog ran"):
        assert got(prompt, **kwargs) == ref(prompt, **kwargs)
    ids = ref.tokenizer("the cat sat on", return_tensors="pt").input_ids.to(device)
    a = ref.model.generate(
        ids,
        **{k: v for k, v in kwargs.items() if k != "return_full_text"},
        output_logits=True,
        return_dict_in_generate=True,
    )
    b = got.model.generate(
        ids,
        **{k: v for k, v in kwargs.items() if k != "return_full_text"},
        output_logits=True,
        return_dict_in_generate=True,
    )
    assert torch.equal(a.sequences, b.sequences)
    assert all(torch.equal(x, y) for x, y in zip(a.logits, b.logits))


@pytest.mark.parametrize("device", DEVICES)
def test_fill_mask(tmp_path, device):
    model, path = _saved(tmp_path, "bert")
    ref = pipeline("fill-mask", model=model.to(device), tokenizer=str(path), top_k=5, device=torch.device(device))
    got = pipeline("fill-mask", model=from_pretrained(path, device_map=device), tokenizer=str(path), top_k=5)
    for text in ("the [MASK] sat on the mat", "a dog [MASK] fast"):
        assert got(text) == ref(text)


@pytest.mark.parametrize("device", DEVICES)
def test_feature_extraction(tmp_path, device):
    model, path = _saved(tmp_path, "bert-base")
    ref = pipeline("feature-extraction", model=model.to(device), tokenizer=str(path), device=torch.device(device))
    got = pipeline("feature-extraction", model=from_pretrained(path, device_map=device), tokenizer=str(path))
    for text in ("the cat sat on the mat", "green tree house"):
        assert got(text) == ref(text)


def test_save_with_tokenizer_argument(tmp_path):
    model = sparsify(tiny("llama"))
    save_pretrained(model, tmp_path / "m", tokenizer=tokenizer())
    assert (tmp_path / "m" / "tokenizer.json").exists()
    out = pipeline("text-generation", model=from_pretrained(tmp_path / "m"), tokenizer=str(tmp_path / "m"))
    assert out("the cat", max_new_tokens=3, do_sample=False)[0]["generated_text"].startswith("the cat")
