import json

import pytest
import torch

from ditpipe.cache import TensorCache, text_key
from ditpipe.config import TextConfig
from ditpipe.encoders import ENCODERS, TextEncoder
from ditpipe.errors import DitpipeError
from ditpipe.io import DiskSet, read_json
from ditpipe.text import run, unique_captions


def write_prepared(root, captions):
    root.mkdir(parents=True, exist_ok=True)
    rows = [{"key": f"k{i}", "caption": c, "split": "train", "file": "", "sha256": str(i)}
            for i, c in enumerate(captions)]
    (root / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_unique_captions_put_empty_first(tmp_path):
    assert list(unique_captions(["b", "a", "b", ""], set())) == ["", "b", "a"]
    with DiskSet(tmp_path, "captions") as seen:  # what the stage uses: the same answer, kept on disk
        assert list(unique_captions(["b", "a", "b", ""], seen)) == ["", "b", "a"] and len(seen) == 3
        assert "a" in seen and "c" not in seen and list(seen) == ["", "b", "a"]
    assert list(tmp_path.iterdir()) == []  # the scratch file is gone


def test_only_new_captions_are_encoded(tmp_path, tiny_text_encoder):
    cfg = TextConfig(encoder=str(tiny_text_encoder), max_length=8)
    write_prepared(tmp_path / "p", ["a red circle", "a blue square", "a red circle"])
    first = run(cfg, tmp_path / "p", tmp_path / "text")
    assert first["encoded"] == 3 and first["unique"] == 3  # two captions + the empty one
    write_prepared(tmp_path / "p", ["a red circle", "a green star"])
    second = run(cfg, tmp_path / "p", tmp_path / "text")
    assert second["encoded"] == 1 and second["cached"] == 2 and second["pruned"] == 1
    index = read_json(tmp_path / "text" / "index.json")
    assert index["captions"] == 3 and not list((tmp_path / "text").rglob(".tmp-*"))  # on-disk sets removed
    key = text_key("a green star", index["encoder_identity"], index["max_length"], index["dtype"])  # as shards finds it
    entry = TensorCache(tmp_path / "text" / "cache").get(key)
    assert entry["emb"].shape == (8, 32) and entry["mask"].shape == (8,) and entry["pooled"].shape == (32,)
    assert entry["mask"].sum() == 5  # [CLS] a green star [SEP]
    empty = TensorCache(tmp_path / "text" / "cache").get(index["empty"])
    assert empty["mask"].sum() == 2
    longer = run(TextConfig(encoder=str(tiny_text_encoder), max_length=16), tmp_path / "p", tmp_path / "text")
    assert longer["encoded"] == 3  # max length is part of the key


def test_default_minilm_is_offline_and_pools_like_sentence_transformers():
    enc = TextEncoder("all-MiniLM-L6-v2", 16, "float32", torch.device("cpu"))
    out = enc.encode(["a red circle", "a small blue square above a red circle"])
    assert out["emb"].shape == (2, 16, 384) and out["pooled"].shape == (2, 384)
    mask = out["mask"].unsqueeze(-1).float()
    torch.testing.assert_close(out["pooled"], (out["emb"] * mask).sum(1) / mask.sum(1))
    assert ENCODERS["all-MiniLM-L6-v2"]().endswith("model")


def _with_bert_tokenizer(model, path, tiny_text_encoder):
    from transformers import AutoTokenizer

    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_text_encoder).save_pretrained(path)
    return path


def test_clip_text_model_uses_its_pooler(tmp_path, tiny_text_encoder):
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, eos_token_id=102)
    path = _with_bert_tokenizer(CLIPTextModel(cfg), tmp_path / "clip", tiny_text_encoder)
    enc = TextEncoder(str(path), 12, "float32", torch.device("cpu"))
    assert enc.model_type == "clip_text_model"
    out = enc.encode(["a red circle"])
    eos = int(out["mask"][0].sum()) - 1  # the [SEP]/EOS position
    torch.testing.assert_close(out["pooled"][0], out["emb"][0, eos])  # CLIP pools the EOS token
    assert not torch.allclose(out["pooled"][0], out["emb"][0][out["mask"][0].bool()].mean(0))


def test_t5_encoder_by_path(tmp_path, tiny_text_encoder):
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(vocab_size=30522, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=2)
    path = _with_bert_tokenizer(T5EncoderModel(cfg), tmp_path / "t5", tiny_text_encoder)
    enc = TextEncoder(str(path), 12, "float32", torch.device("cpu"))
    assert type(enc.model).__name__ == "T5EncoderModel" and enc.dim == 32
    assert enc.encode(["x"])["emb"].shape == (1, 12, 32)


def test_unknown_encoder_is_a_clear_error(tmp_path):
    with pytest.raises(DitpipeError, match="cannot load text.encoder="):
        TextEncoder(str(tmp_path / "nope"), 8, "float32", torch.device("cpu"))
