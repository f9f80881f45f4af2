"""Model builders for the `model_speed` benchmark: deployed architectures from their standard
definitions (Hugging Face `transformers` model code; torchvision/timm are not installable here),
each wrapped to take one tensor (or a tuple of tensors) and return one tensor, so that the same
module is timed in PyTorch, exported to ONNX and compared against its dense version.

Weights are random (seeded) except all-MiniLM-L6-v2 (pretrained, from the zoo): latency does not
depend on weight values, and fidelity on random weights is reported as the relative output error.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class _Logits(nn.Module):
    """Wrap a Hugging Face model: a tensor (or a tuple of tensors) in, its main output tensor out."""

    def __init__(
        self, model: nn.Module, field: str, keyword: str, ones_mask: bool = False, **fixed: Any
    ) -> None:
        super().__init__()
        self.model, self.field, self.keyword, self.fixed = model, field, keyword, fixed
        self.ones_mask = ones_mask

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        kwargs: dict[str, Any] = {self.keyword: x, **self.fixed}
        if mask is None and self.ones_mask:
            mask = torch.ones_like(x)
        if mask is not None:
            kwargs["attention_mask"] = mask
        return getattr(self.model(**kwargs, return_dict=True), self.field)


class GRU2(nn.Module):
    """A 2-layer GRU (hidden 256, input 256) over a (batch, seq, 256) sequence, with a Linear head
    on every step: (batch, seq, 256) -> (batch, seq, 256)."""

    def __init__(self, width: int = 256) -> None:
        super().__init__()
        self.rnn = nn.GRU(width, width, num_layers=2, batch_first=True)
        self.head = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0])


def resnet18() -> nn.Module:
    from transformers import ResNetConfig, ResNetForImageClassification

    cfg = ResNetConfig(
        layer_type="basic", depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512],
        embedding_size=64, num_labels=1000,
    )  # fmt: skip
    return _Logits(ResNetForImageClassification(cfg), "logits", "pixel_values")


def mobilenet_v2() -> nn.Module:
    from transformers import MobileNetV2Config, MobileNetV2ForImageClassification

    return _Logits(
        # tf_padding=False: symmetric padding as in torchvision's MobileNetV2 (HF's TF-style
        # padding reads conv.stride at run time, which a factorized conv does not have)
        MobileNetV2ForImageClassification(MobileNetV2Config(num_labels=1000, tf_padding=False)),
        "logits",
        "pixel_values",
    )


def vit_tiny() -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(
        hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768,
        image_size=224, patch_size=16, num_labels=1000,
    )  # fmt: skip
    # positional embeddings interpolated for images other than 224x224 (HF's option)
    return _Logits(
        ViTForImageClassification(cfg), "logits", "pixel_values", interpolate_pos_encoding=True
    )


def gpt2_small() -> nn.Module:
    """The GPT-2 small transformer (GPT2Model: 12 layers x 768, vocabulary 50257) without the LM
    head: the head is tied to the token embedding, which tensorslim keeps dense, and at this
    machine's speed it would double the timing cost without being compressible."""
    from transformers import GPT2Config, GPT2Model

    cfg = GPT2Config()
    cfg.use_cache = False
    # an explicit all-ones attention mask: without one, transformers looks for packed sequences
    # with torch.diff, which the ONNX exporter does not support
    return _Logits(GPT2Model(cfg), "last_hidden_state", "input_ids", ones_mask=True)


def minilm() -> nn.Module:
    from tensorslim.zoo.minilm import load_minilm

    model, _tok = load_minilm()
    return _Logits(model, "last_hidden_state", "input_ids")


def gru2() -> nn.Module:
    return GRU2()


@dataclass(frozen=True)
class Arch:
    """One benchmarked architecture: its builder, what its input is and how to make one."""

    name: str
    build: Callable[[], nn.Module]
    kind: str  # "image" | "tokens" | "sequence"
    description: str


ARCHS: dict[str, Arch] = {
    a.name: a
    for a in (
        Arch("resnet18", resnet18, "image", "ResNet-18 (HF ResNetConfig basic, 2-2-2-2, 64..512)"),
        Arch(
            "mobilenetv2",
            mobilenet_v2,
            "image",
            "MobileNetV2 (HF MobileNetV2Config, torchvision padding)",
        ),
        Arch("vit-tiny", vit_tiny, "image", "ViT-Tiny (192 wide, 12 layers, 3 heads, patch 16)"),
        Arch("minilm", minilm, "tokens", "all-MiniLM-L6-v2 (pretrained, tensorslim.zoo)"),
        Arch("gru", gru2, "sequence", "2-layer GRU, 256 wide, + Linear head on every step"),
        Arch(
            "gpt2", gpt2_small, "tokens", "GPT-2 small (HF GPT2Config defaults, 12x768, no LM head)"
        ),
    )
}


def build(name: str, seed: int = 0) -> nn.Module:
    """The model in eval mode, its random weights drawn with `seed` (MiniLM: pretrained)."""
    torch.manual_seed(seed)
    return ARCHS[name].build().eval()


def example_input(name: str, batch: int, size: int, seed: int = 0) -> Any:
    """A seeded input: images (batch, 3, size, size); GPT-2 token ids (batch, size) drawn
    uniformly from its vocabulary; MiniLM (input_ids, attention_mask) of `batch` real English
    sentences (fortunes), padded or truncated to `size` tokens; GRU (batch, size, 256)."""
    gen = torch.Generator().manual_seed(seed)
    kind = ARCHS[name].kind
    if kind == "image":
        return torch.randn(batch, 3, size, size, generator=gen)
    if name == "minilm":
        ids, mask = sentence_tokens(sentences(batch, offset=0, seed=seed), size)
        return (ids, mask)
    if kind == "tokens":
        return torch.randint(0, 50257, (batch, size), generator=gen)
    return torch.randn(batch, size, 256, generator=gen)


def sentences(n: int, offset: int = 0, seed: int = 0) -> list[str]:
    """n English sentences from the fortunes collection (tensorslim.zoo.text), from `offset` on."""
    from tensorslim.zoo.text import load_fortune_sentences

    return load_fortune_sentences(seed=seed)[offset : offset + n]


def sentence_tokens(texts: list[str], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), each (len(texts), length): MiniLM's tokenizer, padded to
    `length` and truncated there."""
    from tensorslim.zoo.minilm import load_minilm

    _model, tok = load_minilm()
    enc = tok(texts, padding="max_length", truncation=True, max_length=length, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]
