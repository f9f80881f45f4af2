"""The Austen language-model data (an R lazy-load database read without R), its split, tokenizer,
perplexity, and the lm_text benchmark's --quick path on a tiny random GPT-2.

The lazy-load files are generated here byte by byte in R's XDR serialization format (version 2,
as R's serialize() writes it), so the parser is tested without the Debian package; the real
package is read too when installed."""

from __future__ import annotations

import bz2
import gzip
import importlib
import json
import lzma
import math
import struct
import sys
import zlib
from pathlib import Path

import pytest
import torch

from tensorslim.errors import ModelSpecError

pytest.importorskip("rdata")
transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from tensorslim.zoo import austen  # noqa: E402

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


# -- a minimal R serializer (XDR, format version 2) -----------------------------------------------
def _i(v: int) -> bytes:
    return struct.pack(">i", v)


def _charsxp(s: str | None) -> bytes:
    if s is None:  # NA_STRING
        return _i(9) + _i(-1)
    raw = s.encode("utf-8")
    levels = 64 if s.isascii() else 8  # ASCII_MASK, UTF8_MASK (gp bits, shifted by 12)
    return _i(9 | levels << 12) + _i(len(raw)) + raw


def _r_item(obj) -> bytes:
    """str list -> STRSXP, tuple of ints -> INTSXP, bool -> LGLSXP, dict -> named VECSXP."""
    if isinstance(obj, bool):
        return _i(10) + _i(1) + _i(int(obj))
    if isinstance(obj, tuple):
        return _i(13) + _i(len(obj)) + b"".join(_i(v) for v in obj)
    if isinstance(obj, list):
        return _i(16) + _i(len(obj)) + b"".join(_charsxp(s) for s in obj)
    if isinstance(obj, dict):
        out = _i(19 | 1 << 9) + _i(len(obj)) + b"".join(_r_item(v) for v in obj.values())
        # attributes: pairlist (names = <STRSXP>), then the end of the pairlist
        out += _i(2 | 1 << 10) + _i(1) + _charsxp("names") + _r_item(list(obj)) + _i(254)
        return out
    raise TypeError(type(obj))


def r_serialize(obj) -> bytes:
    return b"X\n" + _i(2) + _i(0x040201) + _i(0x020300) + _r_item(obj)


def _blob(data: bytes, kind: int) -> bytes:
    """One .rdb entry as R's R_compress1/2/3 write it."""
    head = struct.pack(">I", len(data))
    if kind == 1:
        return head + zlib.compress(data)
    if kind == 2:
        return head + b"2" + bz2.compress(data)
    filters = [{"id": lzma.FILTER_LZMA2, "preset": 6}]
    return head + b"Z" + lzma.compress(data, format=lzma.FORMAT_RAW, filters=filters)


def write_lazyload(folder: Path, objects: dict, kind: int = 1) -> Path:
    """folder/Rdata.rdx + folder/Rdata.rdb holding `objects`; returns the .rdx path."""
    folder.mkdir(parents=True, exist_ok=True)
    rdb, variables = b"", {}
    for name, obj in objects.items():
        b = _blob(r_serialize(obj), kind)
        variables[name] = (len(rdb), len(b))
        rdb += b
    index = {"variables": variables, "references": {}, "compressed": (kind,) if kind > 1 else True}
    (folder / "Rdata.rdb").write_bytes(rdb)
    (folder / "Rdata.rdx").write_bytes(gzip.compress(r_serialize(index)))
    return folder / "Rdata.rdx"


def fake_novel(title: str, n_chapters: int, roman: bool = False) -> list[str]:
    numerals = ["I", "II", "III", "IV", "V", "VI", "VII", "VIII", "IX", "X", "XI", "XII"]
    lines = [title.upper(), "", "By Jane Austen", "", ""]
    for c in range(n_chapters):
        if c == n_chapters // 2:
            lines += ["VOLUME II", ""]
        lines += [f"CHAPTER {numerals[c]}" if roman else f"Chapter {c + 1}", "", ""]
        lines += [f"{title} chapter {c + 1} begins here,", "and  goes on.", "", "A second para."]
        lines += ["", ""]
    return lines


FAKE = {name: fake_novel(name, 3 + i, roman=i % 2 == 0) for i, name in enumerate(austen.NOVELS)}


@pytest.fixture
def fake_package(tmp_path):
    write_lazyload(tmp_path / "janeaustenr" / "data", FAKE)
    return tmp_path / "janeaustenr"


# -- the reader ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", [1, 2, 3])
def test_lazyload_db_round_trip(tmp_path, kind):
    objects = {"a": ["x", "héllo wörld", None, ""], "b": ["only"]}
    rdx = write_lazyload(tmp_path, objects, kind)
    got = austen.read_lazyload_db(rdx)
    assert set(got) == {"a", "b"}
    assert [None if s is None else str(s) for s in got["a"]] == objects["a"]
    assert [str(s) for s in got["b"]] == ["only"]


def test_lazyload_db_corrupt_entry_is_refused(tmp_path):
    rdx = write_lazyload(tmp_path, {"a": ["x"]})
    rdb = tmp_path / "Rdata.rdb"
    data = bytearray(rdb.read_bytes())
    data[:4] = struct.pack(">I", 999)  # announced length no longer matches
    rdb.write_bytes(bytes(data))
    with pytest.raises(ModelSpecError, match="999 announced"):
        austen.read_lazyload_db(rdx)
    rdb.write_bytes(b"")
    with pytest.raises(ModelSpecError, match="outside the file"):
        austen.read_lazyload_db(rdx)


def test_missing_package_names_the_apt_command(tmp_path):
    with pytest.raises(ModelSpecError, match="apt-get install -y r-cran-janeaustenr"):
        austen.load_novels(tmp_path / "nowhere")


def test_split_holds_out_the_last_chapters_of_each_novel(fake_package):
    novels = austen.load_novels(fake_package)
    assert list(novels) == list(austen.NOVELS) and novels["emma"] == FAKE["emma"]
    chs = austen.chapters("emma", novels["emma"])
    assert chs[0].heading == "" and chs[0].text.startswith("EMMA\n\nBy Jane Austen")
    assert [c.heading for c in chs[1:]] == [f"Chapter {k}" for k in range(1, 7)]
    # re-flowed paragraphs, whitespace collapsed, the VOLUME line dropped
    assert chs[3].text == "Chapter 3\n\nemma chapter 3 begins here, and goes on.\n\nA second para."
    assert all("VOLUME" not in c.text for c in chs)
    split = austen.austen_split(fake_package)
    n = [3 + i for i in range(6)]  # chapters per novel: 3..8, ceil(10 %) = 1 each
    assert split.valid_chapters == [
        (
            name,
            ("CHAPTER " + ["III", "IV", "V", "VI", "VII", "VIII"][i])
            if i % 2 == 0
            else f"Chapter {n[i]}",
        )
        for i, name in enumerate(austen.NOVELS)
    ]
    assert len(split.train) == sum(n) - 6 + 6  # the other chapters and each front matter
    assert not set(split.train) & set(split.valid)
    assert split == austen.austen_split(fake_package)  # deterministic
    with pytest.raises(ModelSpecError, match="valid_fraction"):
        austen.austen_split(fake_package, valid_fraction=1.0)


@pytest.mark.skipif(
    not (austen.JANEAUSTENR_DIR / "data" / "Rdata.rdx").is_file(),
    reason="Debian package r-cran-janeaustenr not installed (apt-get install -y r-cran-janeaustenr)",
)
def test_real_janeaustenr_package():
    novels = austen.load_novels()
    counts = {
        n: len([c for c in austen.chapters(n, lines) if c.heading]) for n, lines in novels.items()
    }
    assert counts == {
        "sensesensibility": 50,
        "prideprejudice": 61,
        "mansfieldpark": 48,
        "emma": 55,
        "northangerabbey": 31,
        "persuasion": 24,
    }
    pp = austen.chapters("prideprejudice", novels["prideprejudice"])
    assert pp[1].text.startswith(
        "Chapter 1\n\nIt is a truth universally acknowledged, that a single"
    )


# -- tokenizer, windows, perplexity --------------------------------------------------------------
def test_tokenizer_is_deterministic_and_round_trips():
    texts = [" ".join(lines) for lines in FAKE.values()] * 3
    a, b = austen.train_tokenizer(texts, 300), austen.train_tokenizer(texts, 300)
    assert a.to_str() == b.to_str() and a.token_to_id(austen.EOS) == 0
    ids = austen.encode(a, ["Emma chapter 1", "A second para."])
    assert ids.dtype == torch.long and (ids == 0).sum() == 2 and ids[-1] == 0
    first = ids[: int((ids == 0).nonzero()[0])].tolist()
    assert a.decode(first) == "Emma chapter 1"


def test_eval_windows_and_perplexity_match_hf_loss():
    ids = torch.arange(100)
    assert austen.eval_windows(ids, 16).shape == (6, 16)
    spread = austen.eval_windows(ids, 16, max_windows=4)
    assert spread[:, 0].tolist() == [0, 32, 48, 80]  # windows 0, 2, 3, 5 of 6
    with pytest.raises(ModelSpecError, match="no window"):
        austen.eval_windows(ids, 200)
    recipe = austen.GPTRecipe(n_layer=1, n_embd=32, n_head=2, ctx=16, vocab_size=100)
    torch.manual_seed(0)
    model = austen.build_gpt2(recipe).eval()
    wins = austen.random_windows(torch.randint(0, 100, (500,)), 8, 16, seed=0)
    with torch.no_grad():
        ref = model(wins, labels=wins).loss  # Hugging Face's shifted cross-entropy
    assert math.isclose(
        austen.perplexity(model, wins, batch_size=3), math.exp(float(ref)), rel_tol=1e-5
    )
    assert not model.training


# -- the benchmark's quick path ------------------------------------------------------------------
@pytest.fixture
def bench(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(BENCH))
    common = importlib.import_module("_common")
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    sys.modules.pop("lm_text", None)
    return importlib.import_module("lm_text")


def test_benchmark_quick_on_tiny_random_gpt2(bench, tmp_path):
    rows = bench.main(["--tiny", "--quick"])
    assert [r["method"] for r in rows] == ["original", *bench.METHODS]
    dense = rows[0]["perplexity"]
    for r in rows[1:]:
        if r["method"] == "whitened+seq" and not bench.has_sequential():
            assert r["perplexity"] == bench.NOT_AVAILABLE
            continue
        assert r["keep"] == 0.6 and abs(r["achieved keep"] - 0.6) < 0.03
        assert r["model params"] < rows[0]["model params"]
        assert math.isfinite(r["perplexity"])
        assert abs(r["% above dense"] - 100 * (r["perplexity"] / dense - 1)) < 0.01
        assert 0 < r["rel logit error"] < 1
        assert math.isfinite(r["perplexity after recover"])
    payload = json.loads((tmp_path / "lm_text.json").read_text())
    assert payload["tables"][bench.TABLE] == rows and payload["seeds"]["torch"] == 0
    assert "Goals" in payload["tables"] and (tmp_path / "lm_text.md").is_file()


def test_benchmark_without_sequential_records_not_available(bench, monkeypatch):
    monkeypatch.setattr(bench, "has_sequential", lambda: False)
    rows = bench.main(["--tiny", "--quick", "--methods", "svd,whitened+seq", "--no-recover"])
    seq = {r["method"]: r for r in rows}["whitened+seq"]
    assert seq["perplexity"] == bench.NOT_AVAILABLE
    assert {r["method"] for r in rows} == {"original", "svd", "whitened+seq"}
