"""Offline English text for the Transformer benchmarks: sentences from Debian's `fortunes` package and
the VADER sentiment lexicon (words with human-rated valence, from the `vaderSentiment` package)."""

from __future__ import annotations

import random
import re
from pathlib import Path

from tensorslim.errors import ModelSpecError

FORTUNES_DIR = Path("/usr/share/games/fortunes")
# Plain prose collections (no ASCII art, no code, no foreign-language files).
FORTUNE_FILES = (
    "fortunes",
    "wisdom",
    "people",
    "literature",
    "humorists",
    "work",
    "love",
    "education",
    "science",
    "politics",
    "men-women",
    "food",
    "pets",
    "platitudes",
    "miscellaneous",
    "law",
    "medicine",
    "sports",
    "news",
    "kids",
    "magic",
)
FORTUNES_INSTALL = "apt-get install -y fortunes  (Debian; `make bench-deps` does it)"
VADER_INSTALL = "pip install vaderSentiment  (or: pip install 'tensorslim[transformers]')"

_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'])")


def load_fortune_sentences(
    n: int | None = None, seed: int = 0, min_chars: int = 25, max_chars: int = 250
) -> list[str]:
    """English sentences from the fortune collections: quotes split at sentence ends, attribution
    lines ("-- Author") dropped, whitespace collapsed, deduplicated, kept if min_chars..max_chars
    long and mostly letters; shuffled with `seed` and cut to `n`."""
    if not FORTUNES_DIR.is_dir():
        raise ModelSpecError(f"the fortunes text collection is missing; run: {FORTUNES_INSTALL}")
    seen: set[str] = set()
    out: list[str] = []
    for name in FORTUNE_FILES:
        path = FORTUNES_DIR / name
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for quote in text.split("\n%\n"):
            lines = [ln for ln in quote.splitlines() if not ln.strip().startswith("--")]
            body = " ".join(" ".join(lines).split())
            for sent in _SENTENCE.split(body):
                sent = sent.strip()
                letters = sum(c.isalpha() or c == " " for c in sent)
                if not (min_chars <= len(sent) <= max_chars) or letters < 0.85 * len(sent):
                    continue
                if sent.lower() in seen:
                    continue
                seen.add(sent.lower())
                out.append(sent)
    if not out:
        raise ModelSpecError(
            f"no sentences found under {str(FORTUNES_DIR)!r}; run: {FORTUNES_INSTALL}"
        )
    out.sort()
    random.Random(seed).shuffle(out)
    return out if n is None else out[:n]


def load_vader_lexicon(alpha_only: bool = True) -> list[tuple[str, float]]:
    """(word, mean human valence in [-4, 4]) pairs from VADER's lexicon (Hutto & Gilbert 2014);
    alpha_only keeps plain words (no emoticons or abbreviations with symbols)."""
    try:
        import vaderSentiment
    except ImportError:
        raise ModelSpecError(f"the VADER lexicon is not installed; run: {VADER_INSTALL}") from None
    path = Path(vaderSentiment.__file__).parent / "vader_lexicon.txt"
    if not path.is_file():
        raise ModelSpecError(f"{str(path)!r} is missing; run: {VADER_INSTALL}")
    pairs = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) < 2:
            continue
        word = parts[0].strip()
        if alpha_only and not word.isalpha():
            continue
        try:
            pairs.append((word, float(parts[1])))
        except ValueError:
            continue
    return pairs
