"""Cheap checks first, and oversized inputs as WorkbenchErrors (issue 10, items 7 and 8):
images over PIL's pixel limit or with corrupt data, prompts far over the context, absurd
dataset sizes."""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import pytest
from PIL import Image

from workbench.errors import WorkbenchError
from workbench.inputs.conditions import load_image


# -- images ------------------------------------------------------------------------------------
def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_declaring(width: int, height: int) -> bytes:
    """A few dozen bytes: a PNG header that declares ``width x height`` RGB pixels, and almost no data."""
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + _chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + _chunk(b"IEND", b"")
    )


def real_png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


def test_a_header_declaring_a_huge_image_is_refused_without_decoding(tmp_path):
    f = tmp_path / "bomb.png"
    f.write_bytes(png_declaring(100_000, 100_000))
    assert f.stat().st_size < 100
    limit = Image.MAX_IMAGE_PIXELS
    with pytest.raises(WorkbenchError) as err:
        load_image(f)
    assert "10000000000 pixels" in err.value.message and f"limit of {limit} pixels" in err.value.message
    assert str(f) in err.value.message and "downscale" in err.value.fix


def test_over_the_warning_limit_is_an_error_too_and_the_limit_is_left_alone(tmp_path, monkeypatch):
    """PIL only warns between MAX_IMAGE_PIXELS and twice that, and then decodes the whole image."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # so a 40 x 40 image (1600 pixels) is "large"
    f = tmp_path / "big.png"
    f.write_bytes(real_png(40, 40))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(WorkbenchError, match=r"1600 pixels, over the limit of 1000 pixels"):
            load_image(f)
    assert caught == []  # no DecompressionBombWarning printed either
    assert Image.MAX_IMAGE_PIXELS == 1000
    small = tmp_path / "small.png"
    small.write_bytes(real_png(20, 20))
    assert load_image(small).size == (20, 20)
    # the caller's warning filters are untouched: PIL's warning still only warns outside load_image
    with pytest.warns(Image.DecompressionBombWarning):
        Image.open(f).close()


@pytest.mark.parametrize(
    "name, data",
    [
        ("truncated", real_png(64, 64)[:-40]),
        ("header only", png_declaring(8, 8)),  # declares 8 x 8 pixels, holds 16 bytes
        ("empty", b""),
        ("not an image", b"GIF89a" + b"\0" * 20),
        ("garbage", b"\x89PNG\r\n\x1a\n" + b"\xff" * 64),
    ],
)
def test_truncated_or_corrupt_images(tmp_path, name, data):
    f = tmp_path / "x.png"
    f.write_bytes(data)
    with pytest.raises(WorkbenchError, match="cannot read image") as err:
        load_image(f)
    assert str(f) in err.value.message and "\n" not in err.value.message


# -- prompts far over the context ----------------------------------------------------------------
CONTEXT_ERROR = r"prompt 'huge' has (at least )?\d+ tokens, longer than the model's context of \d+"
LONG = 50 * 1024 * 1024


class SpyTokenizer:
    """Delegates to a tokenizer and records the length of every text it is asked to tokenize."""

    def __init__(self, tok) -> None:
        self._tok = tok
        self.lengths: list[int] = []

    def __call__(self, text, *args, **kwargs):
        self.lengths.append(len(text) if isinstance(text, str) else sum(map(len, text)))
        return self._tok(text, *args, **kwargs)

    def encode(self, text, *args, **kwargs):
        self.lengths.append(len(text))
        return self._tok.encode(text, *args, **kwargs)

    def __len__(self) -> int:
        return len(self._tok)

    def __getattr__(self, name):
        if name in ("backend_tokenizer",):  # the Rust tokenizer could tokenize behind our back: spy on it too
            return _SpyBackend(getattr(self._tok, name), self.lengths)
        return getattr(self._tok, name)


class _SpyBackend:
    def __init__(self, backend, lengths) -> None:
        self._b, self._lengths = backend, lengths

    def encode(self, text, *args, **kwargs):
        self._lengths.append(len(text))
        return self._b.encode(text, *args, **kwargs)

    def encode_batch(self, texts, *args, **kwargs):
        self._lengths.append(sum(map(len, texts)))
        return self._b.encode_batch(texts, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._b, name)


@pytest.fixture(scope="module")
def tiny_tok(tiny_dirs):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dirs["llama"])


@pytest.fixture(scope="module")
def smol_tok():
    from transformers import AutoTokenizer

    from workbench.models.embedded import ensure_embedded

    return AutoTokenizer.from_pretrained(ensure_embedded(quiet=True))


def _assert_rejected_without_tokenizing(tok, text: str, n_ctx: int) -> None:
    from workbench.inputs.prompts import Prompt, tokenize_prompts

    spy = SpyTokenizer(tok)
    with pytest.raises(WorkbenchError, match=CONTEXT_ERROR) as err:
        tokenize_prompts(
            [Prompt("ok", text="the king said"), Prompt("huge", text=text)], spy, n_ctx=n_ctx, vocab_size=len(tok)
        )
    assert err.value.fix.startswith("shorten or split the prompt")
    assert spy.lengths and max(spy.lengths) < 1_000_000, f"the tokenizer saw {max(spy.lengths)} characters"


@pytest.mark.parametrize("unit", ["the king said unto them ", "xyzzy ", ", ", "\n\nété 😀 "])
def test_a_50mb_prompt_fails_the_context_check_without_tokenizing_it_tiny(tiny_tok, unit):
    _assert_rejected_without_tokenizing(tiny_tok, unit * (LONG // len(unit.encode())), n_ctx=256)


def test_texts_short_for_a_lossy_tokenizer_are_not_rejected_as_long(tiny_tok):
    """The tiny word-level vocabulary drops whitespace and maps a whole unknown word to one [UNK]:
    millions of spaces are 0 tokens and millions of letters 1 token for it, not "too long"."""
    from workbench.inputs.prompts import Prompt, tokenize_prompts

    with pytest.raises(WorkbenchError, match="is empty"):
        tokenize_prompts([Prompt("spaces", text=" " * 1_000_000)], tiny_tok, n_ctx=256, vocab_size=len(tiny_tok))
    out = tokenize_prompts([Prompt("word", text="a" * 1_000_000)], tiny_tok, n_ctx=256, vocab_size=len(tiny_tok))
    assert out[0].ids == [tiny_tok.unk_token_id]


@pytest.mark.smollm2
@pytest.mark.parametrize("unit", ["the king said unto them ", "a", " ", "\n", "été ", "😀", "<|endoftext|>"])
def test_a_50mb_prompt_fails_the_context_check_without_tokenizing_it_smollm2(smol_tok, unit):
    _assert_rejected_without_tokenizing(smol_tok, unit * (LONG // len(unit.encode())), n_ctx=8192)


def test_a_normal_too_long_prompt_gives_the_exact_count(tiny_tok):
    from workbench.inputs.prompts import Prompt, tokenize_prompts

    text = " ".join(["the king said"] * 90)  # 270 tokens
    with pytest.raises(WorkbenchError, match=r"prompt 'huge' has 270 tokens, longer than the model's context of 256"):
        tokenize_prompts([Prompt("huge", text=text)], tiny_tok, n_ctx=256, vocab_size=len(tiny_tok))
    assert len(tokenize_prompts([Prompt("fits", text=text)], tiny_tok, n_ctx=270, vocab_size=len(tiny_tok))[0]) == 270


def test_huge_token_lists_are_rejected_before_they_are_copied():
    from workbench.inputs.prompts import Prompt, tokenize_prompts

    class Tokens(list):
        def __iter__(self):
            raise AssertionError("the token list was walked before its length was checked")

    with pytest.raises(WorkbenchError, match=CONTEXT_ERROR):
        tokenize_prompts([Prompt("huge", tokens=Tokens([5] * 100_000))], tokenizer=None, n_ctx=256, vocab_size=512)


def _sample_texts() -> list[str]:
    from workbench.inputs.corpus import load_documents

    docs = [d["text"] for d in load_documents()[:40]]
    return docs + [
        "   leading and  inner   spaces\t\ttabs\n\n\nnewlines   ",
        "\x00\x01 control \x7f chars ﬁ ① Ａ e\u0301 😀 𠀋 \u200b",
        "<|endoftext|>[BOS] special <|im_start|> tokens [UNK] in text",
        "xqzjvkwpfhxqzjvkwpfh" * 50,
        "-" * 3000 + "=" * 3000 + " " * 3000,
        "1234567890" * 300,
    ]


@pytest.mark.parametrize("which", ["tiny", pytest.param("smollm2", marks=pytest.mark.smollm2)])
def test_the_lower_bound_never_exceeds_the_real_count(tiny_tok, which, request):
    from workbench.inputs.token_bounds import min_tokens

    tok = tiny_tok if which == "tiny" else request.getfixturevalue("smol_tok")
    for text in _sample_texts():
        real = len(tok(text, add_special_tokens=False)["input_ids"])
        for enough in (0, 10, 10**9):
            assert min_tokens(tok, text, enough) <= real, (text[:60], real)
    assert min_tokens(tok, "the king said " * 1000, 100) > 100  # and it is not vacuous


@pytest.mark.smollm2
def test_the_bound_is_not_vacuous_on_smollm2(smol_tok):
    from workbench.inputs.token_bounds import min_tokens

    assert min_tokens(smol_tok, "the king said " * 100_000, 8192) > 8192
    assert min_tokens(smol_tok, "a" * 10_000_000, 8192) > 8192  # one pre-token: the byte bound


def test_read_prompts_handles_a_50mb_line_and_many_lines(tmp_path):
    from workbench.inputs.prompts import read_prompts

    f = tmp_path / "p.jsonl"
    f.write_text('{"id": "huge", "text": "' + "the king said " * (LONG // 14) + '"}\n', encoding="utf-8")
    assert len(read_prompts(f)[0].text) > LONG - 14
    many = tmp_path / "many.jsonl"
    many.write_text("".join(f'{{"id": "{i}", "text": "x"}}\n' for i in range(100_000)), encoding="utf-8")
    assert len(read_prompts(many)) == 100_000


def test_a_huge_context_item_is_refused_before_tokenizing(tiny_tok):
    from types import SimpleNamespace

    from workbench.inputs.conditions import passage_pair
    from workbench.inputs.prompts import Prompt

    spy = SpyTokenizer(tiny_tok)
    model = SimpleNamespace(tokenizer=spy, n_ctx=256)
    item = Prompt("huge", text="what did the king say?", meta={"context": "the king said unto them " * 2_000_000})
    with pytest.raises(
        WorkbenchError, match=r"item 'huge' has at least \d+ tokens, longer than the model's context of 256"
    ):
        passage_pair(model, item)
    assert max(spy.lengths, default=0) < 1_000_000
    ok = passage_pair(model, Prompt("ok", text="what did the king say?", meta={"context": "the king said unto them"}))
    assert len(ok.cond) > len(ok.base)


# -- prompts files: the same input classes as pairs files ------------------------------------------
@pytest.mark.parametrize(
    "line, message",
    [
        ('{"id": [1], "text": "x"}', "'id' must be a string or an integer, got a list"),
        ('{"id": true, "text": "x"}', "'id' must be a string or an integer, got a boolean"),
        ('{"id": null, "text": "x"}', "'id' must be a string or an integer, got null"),
        ('{"id": "a", "text": 5}', "'text' of prompt 'a' must be a string"),
        ("[1, 2]", "expected a JSON object, got list"),
    ],
)
def test_bad_prompt_lines_name_file_and_line(tmp_path, line, message):
    from workbench.inputs.prompts import read_prompts

    f = tmp_path / "p.jsonl"
    f.write_text('{"id": "ok", "text": "fine"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(WorkbenchError, match=rf"{f}:2: ") as err:
        read_prompts(f)
    assert message in err.value.message


def test_prompts_file_not_utf8_names_the_line_and_a_bom_is_fine(tmp_path):
    from workbench.inputs.prompts import read_prompts

    f = tmp_path / "p.jsonl"
    f.write_bytes(b'{"id": "a", "text": "ok"}\n{"id": "b", "text": "caf\xe9"}\n')
    with pytest.raises(WorkbenchError, match=rf"{f}:2: not UTF-8") as err:
        read_prompts(f)
    assert "UTF-8" in err.value.fix
    f.write_bytes(b'\xef\xbb\xbf{"id": 7, "text": "ok"}\n')
    assert [p.id for p in read_prompts(f)] == ["7"]
