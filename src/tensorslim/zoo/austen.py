"""Jane Austen's six novels as language-model text, a byte-level BPE tokenizer trained on them and a
small GPT-2 trained on them (the decoder language-model setting of SVD-LLM, Wang et al. 2024).

Text: Debian's `r-cran-janeaustenr` (Silge 2016, the Project Gutenberg texts), an R package whose
data is an R lazy-load database (`data/Rdata.rdx` index + `data/Rdata.rdb` blobs). It is read
without R: the index and every blob are R serializations (the index gzip-compressed, each blob a
4-byte big-endian length followed by a zlib, bzip2 or xz stream), parsed with the `rdata` package.

Split (deterministic): each novel is cut at its chapter headings ("CHAPTER I", "Chapter 1"); the
last ceil(10 %) of each novel's chapters (Sense and Sensibility 5, Pride and Prejudice 7, Mansfield
Park 5, Emma 6, Northanger Abbey 4, Persuasion 3: 30 of 269) are the validation text, everything
else (front matter included) the training text.

Tokenizer and model are trained once (seeded) and cached under $TENSORSLIM_CACHE
(default ~/.cache/tensorslim): the tokenizer as JSON, the model as safetensors with its training
record in the file's metadata.
"""

from __future__ import annotations

import bz2
import json
import lzma
import math
import re
import time
import warnings
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tensorslim.errors import ModelSpecError
from tensorslim.zoo import cache_dir

JANEAUSTENR_DIR = Path("/usr/lib/R/site-library/janeaustenr")
INSTALL = "apt-get install -y r-cran-janeaustenr  (Debian; `make bench-deps` does it)"
RDATA_INSTALL = "pip install rdata  (or: pip install 'tensorslim[bench]')"
# The object names in the package, in publication order.
NOVELS = (
    "sensesensibility",
    "prideprejudice",
    "mansfieldpark",
    "emma",
    "northangerabbey",
    "persuasion",
)
VALID_FRACTION = 0.1
EOS = "<|endoftext|>"
CACHE_VERSION = 1

_HEADING = re.compile(r"^(?:CHAPTER|Chapter) (?:[0-9]+|[IVXLC]+)\.?$")
_VOLUME = re.compile(r"^VOLUME [IVX]+$")


# -- reading the R lazy-load database ------------------------------------------------------------
def _parse_r(data: bytes) -> Any:
    """A Python object from R serialization bytes (gzip-compressed or plain XDR)."""
    try:
        import rdata
    except ImportError:
        raise ModelSpecError(
            f"the `rdata` package is not installed; run: {RDATA_INSTALL}"
        ) from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        parsed = rdata.parser.parse_data(data, extension=".rds")
        return rdata.conversion.convert(parsed)


def _decompress_blob(blob: bytes, kind: int, where: str) -> bytes:
    """One lazy-load blob: 4-byte big-endian uncompressed length, then the stream. kind is the
    index's `compressed` value: 1 zlib; 2 and 3 put a type byte first ('1' zlib, '2' bzip2,
    'Z' xz as a raw LZMA2 stream, '0' stored), as R's R_compress2/R_compress3 write them."""
    if len(blob) < 5:
        raise ModelSpecError(f"{where}: truncated entry ({len(blob)} bytes)")
    size = int.from_bytes(blob[:4], "big")
    body, tag = blob[4:], b"1"
    if kind in (2, 3):
        tag, body = blob[4:5], blob[5:]
    try:
        if tag == b"1":
            out = zlib.decompress(body)
        elif tag == b"2":
            out = bz2.decompress(body)
        elif tag == b"Z":
            filters = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]
            out = lzma.decompress(body, format=lzma.FORMAT_RAW, filters=filters)
        elif tag == b"0":
            out = bytes(body)
        else:
            raise ModelSpecError(f"{where}: unknown compression type byte {tag!r}")
    except (zlib.error, OSError, lzma.LZMAError, EOFError) as exc:
        raise ModelSpecError(f"{where}: cannot decompress ({exc})") from exc
    if len(out) != size:
        raise ModelSpecError(f"{where}: {len(out)} bytes after decompression, {size} announced")
    return out


def read_lazyload_db(rdx: str | Path) -> dict[str, Any]:
    """Every object of an R lazy-load database `name.rdx` (beside it `name.rdb`), by name.

    The .rdx index is a serialized list (variables = name -> c(offset, length) into the .rdb,
    references, compressed); objects that refer to environments (`references`) are refused."""
    rdx = Path(rdx)
    rdb = rdx.with_suffix(".rdb")
    for p in (rdx, rdb):
        if not p.is_file():
            raise ModelSpecError(f"R lazy-load database file {str(p)!r} is missing")
    index = _parse_r(rdx.read_bytes())
    if not isinstance(index, dict) or "variables" not in index:
        raise ModelSpecError(f"{str(rdx)!r} is not an R lazy-load index (no `variables`)")
    if index.get("references"):
        raise ModelSpecError(f"{str(rdx)!r} holds environment references, which are not read")
    comp = index.get("compressed", [1])
    kind = int(comp[0]) if hasattr(comp, "__len__") else int(comp)
    data = rdb.read_bytes()
    out = {}
    for name, pos in index["variables"].items():
        off, n = (int(v) for v in pos)
        if off < 0 or n < 0 or off + n > len(data):
            raise ModelSpecError(f"{str(rdb)!r}: entry {name!r} lies outside the file")
        where = f"{str(rdb)!r} entry {name!r}"
        out[str(name)] = _parse_r(_decompress_blob(data[off : off + n], kind, where))
    return out


def load_novels(path: str | Path | None = None) -> dict[str, list[str]]:
    """The six novels as lists of text lines (Project Gutenberg line breaks), in NOVELS order.
    path: the janeaustenr package folder (default the Debian one); ModelSpecError naming the apt
    command when it is missing."""
    root = Path(path) if path is not None else JANEAUSTENR_DIR
    rdx = root / "data" / "Rdata.rdx"
    if not rdx.is_file():
        raise ModelSpecError(f"Jane Austen's novels are missing ({str(rdx)!r}); run: {INSTALL}")
    objects = read_lazyload_db(rdx)
    missing = [n for n in NOVELS if n not in objects]
    if missing:
        raise ModelSpecError(f"{str(rdx)!r} lacks {', '.join(missing)}; run: {INSTALL}")
    return {n: ["" if s is None else str(s) for s in objects[n]] for n in NOVELS}


# -- chapters and the split ----------------------------------------------------------------------
@dataclass(frozen=True)
class Chapter:
    """One chapter (or the front matter, heading ""): paragraphs separated by blank lines."""

    novel: str
    heading: str
    text: str


def _paragraphs(lines: Sequence[str]) -> str:
    """Lines re-flowed into paragraphs (blank-line separated), whitespace collapsed."""
    paras, cur = [], []
    for line in [*lines, ""]:
        if line.strip():
            cur.append(line.strip())
        elif cur:
            paras.append(" ".join(" ".join(cur).split()))
            cur = []
    return "\n\n".join(paras)


def chapters(novel: str, lines: Sequence[str]) -> list[Chapter]:
    """The novel cut at its chapter headings; the text before the first one is a Chapter with
    heading "" (first), "VOLUME n" lines are dropped."""
    starts = [i for i, line in enumerate(lines) if _HEADING.match(line.strip())]
    if not starts:
        raise ModelSpecError(f"no chapter headings found in {novel!r}")
    bounds = [0, *starts, len(lines)]
    out = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        body = [ln for ln in lines[a:b] if not _VOLUME.match(ln.strip())]
        heading = lines[a].strip() if a in starts else ""
        if heading:
            body = body[1:]
        text = _paragraphs(body)
        out.append(Chapter(novel, heading, f"{heading}\n\n{text}" if heading else text))
    return out


@dataclass(frozen=True)
class AustenSplit:
    """Training and validation texts (one string per chapter) and the validation chapters."""

    train: list[str]
    valid: list[str]
    valid_chapters: list[tuple[str, str]]  # (novel, heading)


def austen_split(
    path: str | Path | None = None, valid_fraction: float = VALID_FRACTION
) -> AustenSplit:
    """The deterministic split: the last ceil(valid_fraction x chapters) of each novel held out."""
    if not 0.0 < valid_fraction < 1.0:
        raise ModelSpecError(f"valid_fraction must be in (0, 1); got {valid_fraction!r}")
    train, valid, names = [], [], []
    for novel, lines in load_novels(path).items():
        chs = chapters(novel, lines)
        front = [c for c in chs if not c.heading]
        body = [c for c in chs if c.heading]
        n_valid = max(1, math.ceil(valid_fraction * len(body)))
        train += [c.text for c in front + body[:-n_valid] if c.text]
        valid += [c.text for c in body[-n_valid:]]
        names += [(novel, c.heading) for c in body[-n_valid:]]
    return AustenSplit(train, valid, names)


# -- tokenizer -----------------------------------------------------------------------------------
def train_tokenizer(texts: Sequence[str], vocab_size: int = 4096) -> Any:
    """A byte-level BPE (GPT-2's scheme, Radford et al. 2019) trained with `tokenizers` on texts;
    the special token EOS gets id 0. Deterministic for the same texts."""
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    except ImportError:
        raise ModelSpecError(
            "the `tokenizers` package is not installed; run: pip install 'tensorslim[transformers]'"
        ) from None
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    return tok


def austen_tokenizer(vocab_size: int = 4096, split: AustenSplit | None = None) -> Any:
    """The BPE tokenizer of the training text, from the cache or trained now and cached (JSON)."""
    from tokenizers import Tokenizer

    from tensorslim.io import atomic_write_file

    path = cache_dir() / f"austen-bpe{vocab_size}-v{CACHE_VERSION}.json"
    if path.is_file():
        try:
            return Tokenizer.from_file(str(path))
        except Exception:  # a corrupt cache entry is simply retrained
            pass
    split = split or austen_split()
    tok = train_tokenizer(split.train, vocab_size)
    atomic_write_file(path, lambda tmp: tmp.write_text(tok.to_str()))
    return tok


def encode(tok: Any, texts: Sequence[str]) -> torch.Tensor:
    """One stream of token ids (int64): each text's tokens followed by the EOS id."""
    eos = tok.token_to_id(EOS)
    ids: list[int] = []
    for enc in tok.encode_batch(list(texts)):
        ids += enc.ids
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


# -- windows and perplexity ----------------------------------------------------------------------
def random_windows(ids: torch.Tensor, n: int, ctx: int, seed: int) -> torch.Tensor:
    """(n, ctx) windows of the stream at seeded random offsets."""
    if ids.numel() <= ctx:
        raise ModelSpecError(f"a stream of {ids.numel()} tokens has no window of {ctx}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - ctx, (n,), generator=g)
    return torch.stack([ids[s : s + ctx] for s in starts.tolist()])


def eval_windows(ids: torch.Tensor, ctx: int, max_windows: int | None = None) -> torch.Tensor:
    """(m, ctx) consecutive non-overlapping windows of the stream; with max_windows, that many
    spread evenly over it (first and last included)."""
    m = ids.numel() // ctx
    if m == 0:
        raise ModelSpecError(f"a stream of {ids.numel()} tokens has no window of {ctx}")
    wins = ids[: m * ctx].view(m, ctx)
    if max_windows is not None and max_windows < m:
        wins = wins[torch.linspace(0, m - 1, max_windows).round().long()]
    return wins


def lm_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of a (batch, T) id tensor under a causal LM (a scalar)."""
    logits = model(batch).logits
    return nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)
    )


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 32) -> float:
    """exp(mean next-token cross-entropy) over all predicted tokens of the windows (each window
    predicts its tokens 2..T from the ones before, no context across windows); eval mode."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for i in range(0, windows.shape[0], batch_size):
            b = windows[i : i + batch_size]
            n = b.shape[0] * (b.shape[1] - 1)
            total += float(lm_loss(model, b)) * n
            count += n
    finally:
        model.train(was)
    return math.exp(total / count)


# -- the model -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class GPTRecipe:
    """Architecture and training recipe of the Austen GPT-2 (AdamW, warmup + cosine lr)."""

    n_layer: int = 6
    n_embd: int = 256
    n_head: int = 4
    ctx: int = 128
    vocab_size: int = 4096
    # 1920 steps x 16 x 128 tokens, ~3.6 passes over the training text: validation perplexity
    # 61.4 (all windows), trained in 1273 s on 2 threads; 480 steps (one pass) stopped at 119.9.
    steps: int = 1920
    batch_size: int = 16
    lr: float = 1.5e-3
    min_lr_ratio: float = 0.1
    warmup: int = 80
    weight_decay: float = 0.1
    clip: float = 1.0

    def tag(self) -> str:
        return (
            f"L{self.n_layer}d{self.n_embd}h{self.n_head}c{self.ctx}v{self.vocab_size}"
            f"s{self.steps}b{self.batch_size}lr{self.lr:g}"
        )


def build_gpt2(recipe: GPTRecipe, eos_id: int = 0) -> nn.Module:
    """An untrained GPT2LMHeadModel of the recipe's shape, no dropout, lm_head tied to wte."""
    try:
        import transformers
    except ImportError:
        raise ModelSpecError(
            "transformers is not installed; run: pip install 'tensorslim[transformers]'"
        ) from None
    cfg = transformers.GPT2Config(
        vocab_size=recipe.vocab_size,
        n_positions=recipe.ctx,
        n_embd=recipe.n_embd,
        n_layer=recipe.n_layer,
        n_head=recipe.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        tie_word_embeddings=True,
    )
    return transformers.GPT2LMHeadModel(cfg)


def train_lm(
    model: nn.Module,
    ids: torch.Tensor,
    recipe: GPTRecipe,
    seed: int = 0,
    log: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train in place on seeded random windows of the stream; returns the loss per step.
    AdamW (betas 0.9/0.95, weight decay on matrices only), linear warmup then cosine decay to
    min_lr_ratio x lr (Loshchilov & Hutter 2017), gradient norm clipped."""
    g = torch.Generator().manual_seed(seed)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": recipe.weight_decay},
            {"params": other, "weight_decay": 0.0},
        ],
        lr=recipe.lr,
        betas=(0.9, 0.95),
    )

    def lr_at(step: int) -> float:
        if step < recipe.warmup:
            return recipe.lr * (step + 1) / recipe.warmup
        t = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
        lo = recipe.min_lr_ratio * recipe.lr
        return lo + 0.5 * (recipe.lr - lo) * (1 + math.cos(math.pi * t))

    model.train()
    losses = []
    hi = ids.numel() - recipe.ctx
    for step in range(recipe.steps):
        starts = torch.randint(0, hi, (recipe.batch_size,), generator=g).tolist()
        batch = torch.stack([ids[s : s + recipe.ctx] for s in starts])
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = lm_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), recipe.clip)
        opt.step()
        losses.append(float(loss.detach()))
        if log is not None:
            log(step, losses[-1])
    return losses


@dataclass
class AustenLM:
    """The trained model (eval mode), its tokenizer, the token streams and the training record."""

    model: nn.Module
    tokenizer: Any
    train_ids: torch.Tensor
    valid_ids: torch.Tensor
    recipe: GPTRecipe
    record: dict[str, Any]


def austen_gpt2(
    recipe: GPTRecipe | None = None,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> AustenLM:
    """The GPT-2 of `recipe` trained on the Austen training text, from the cache or trained now
    (seeded; ~21 min on 2 CPU threads for the default recipe) and cached atomically."""
    from safetensors import safe_open
    from safetensors.torch import load_model, save_model

    from tensorslim.io import atomic_write_file

    recipe = recipe or GPTRecipe()
    split = austen_split()
    tok = austen_tokenizer(recipe.vocab_size, split)
    train_ids, valid_ids = encode(tok, split.train), encode(tok, split.valid)
    eos = tok.token_to_id(EOS)
    path = cache_dir() / f"austen-gpt2-{recipe.tag()}-seed{seed}-v{CACHE_VERSION}.safetensors"
    model = build_gpt2(recipe, eos)
    if path.is_file():
        try:
            load_model(model, str(path))
            with safe_open(str(path), "pt") as f:
                record = json.loads((f.metadata() or {}).get("record", "{}"))
            return AustenLM(model.eval(), tok, train_ids, valid_ids, recipe, record)
        except Exception:  # a corrupt or stale cache entry is simply retrained
            model = build_gpt2(recipe, eos)
    torch.manual_seed(seed)
    model = build_gpt2(recipe, eos)

    def step_log(step: int, loss: float) -> None:
        if log is not None and (step % 20 == 0 or step == recipe.steps - 1):
            log(f"step {step + 1}/{recipe.steps} loss {loss:.3f} [{time.time() - t0:.0f}s]")

    t0 = time.time()
    losses = train_lm(model, train_ids, recipe, seed=seed, log=step_log)
    seconds = time.time() - t0
    record = {
        "recipe": asdict(recipe),
        "seed": seed,
        "train_seconds": round(seconds, 1),
        "torch_threads": torch.get_num_threads(),
        "train_tokens": int(train_ids.numel()),
        "valid_tokens": int(valid_ids.numel()),
        "final_train_loss_mean_last20": round(sum(losses[-20:]) / len(losses[-20:]), 4),
    }
    meta = {"record": json.dumps(record)}
    atomic_write_file(path, lambda tmp: save_model(model, str(tmp), metadata=meta))
    return AustenLM(model.eval(), tok, train_ids, valid_ids, recipe, record)


def iter_batches(windows: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    """The rows of `windows` in consecutive batches (calibration input for compress)."""
    for i in range(0, windows.shape[0], batch_size):
        yield windows[i : i + batch_size]
