"""CLIP BPE ids of openai/clip-vit-large-patch14, rebuilt offline from the openai-clip package,
checked against the original UniDiffuser stack (tests/data/tokenizer_oracle.json, made by
tests/data/make_tokenizer_oracle.py with transformers 4.23.1's slow CLIPTokenizer + ftfy 6.1.1)."""
import json
import logging
from collections import Counter
from pathlib import Path

import pytest

from unidiffuser import tokenizer

ORACLE = json.loads((Path(__file__).parent / "data" / "tokenizer_oracle.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    tokenizer.write_tokenizer_files(folder)
    return folder


@pytest.fixture(scope="module")
def tok(tok_dir):
    return tokenizer.Tokenizer(tok_dir)


def test_oracle_covers_the_messy_categories():
    assert ORACLE["versions"]["transformers"] == "4.23.1" and ORACLE["versions"]["ftfy"] == "6.1.1"
    counts = Counter(c["category"] for c in ORACLE["cases"])
    assert sum(counts.values()) >= 100
    for cat in ("html", "mojibake", "quotes", "fullwidth", "ligatures", "control", "whitespace", "greek",
                "turkish", "german", "emoji", "cjk", "combining", "long", "empty", "numbers", "special",
                "contractions"):
        assert counts[cat] >= 2, cat


def test_ids_equal_the_original_stack(tok):
    wrong = []
    for case in ORACLE["cases"]:
        ids = tok([case["prompt"]])[0].tolist()
        if ids != case["ids"]:
            wrong.append(f"{case['category']}: {case['prompt']!r}")
    assert not wrong, f"{len(wrong)} of {len(ORACLE['cases'])} prompts differ from the original:\n" + "\n".join(wrong)


def test_batch_equals_one_by_one(tok):
    cases = ORACLE["cases"][:40]
    ids = tok([c["prompt"] for c in cases])
    assert ids.shape == (len(cases), 77)
    assert ids.tolist() == [c["ids"] for c in cases]


def test_known_ids(tok):
    ids = tok(["a photo of a cat"])
    assert ids.shape == (1, 77)
    assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert (ids[0, 7:] == 49407).all()


def test_vocabulary_size_and_specials(tok):
    ids = tok(["Hello World!! café 123"])[0].tolist()
    # lower-cased, punctuation runs kept together, digits split one by one
    assert ids[:9] == [49406, 3306, 1002, 748, 15304, 272, 273, 274, 49407]
    assert len(tok.vocab) == 49408 and max(tok.vocab.values()) == 49407


def test_batch_and_empty_prompt(tok):
    ids = tok(["", "a cat"])
    assert ids[0, :2].tolist() == [49406, 49407] and (ids[0, 2:] == 49407).all()
    assert ids[1, :4].tolist() == [49406, 320, 2368, 49407]
    assert tok([]).shape == (0, 77)


def test_long_prompt_truncated_with_warning(tok, caplog):
    with caplog.at_level(logging.WARNING, logger="unidiffuser"):
        ids = tok(["cat " * 100])
    assert ids.shape == (1, 77) and ids[0, 0] == 49406 and ids[0, -1] == 49407
    assert (ids[0, 1:76] == 2368).all()
    assert "102 tokens" in caplog.text and "cut" in caplog.text


def test_exactly_full_prompt_not_warned(tok, caplog):
    with caplog.at_level(logging.WARNING, logger="unidiffuser"):
        ids = tok(["cat " * 75])
    assert (ids[0, 1:76] == 2368).all() and ids[0, 76] == 49407
    assert caplog.text == ""


def test_missing_files_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        tokenizer.Tokenizer(tmp_path)


@pytest.mark.parametrize("name, content, expected", [
    ("vocab.json", "{not json", "vocab.json: not a readable JSON"),
    ("vocab.json", b"\xff\xfe{}", "vocab.json: not a readable JSON"),
    ("vocab.json", "[1, 2, 3]", "vocab.json: expected CLIP's vocabulary"),
    ("vocab.json", '{"a": 0}', "vocab.json: expected CLIP's vocabulary"),
    ("merges.txt", "#version: 0.2\na b\n", "merges.txt: expected a header line and 48894 merges"),
    ("merges.txt", b"#version: 0.2\n\xff\xff\n", "merges.txt: not a readable merge list"),
])
def test_malformed_files_named(tok_dir, tmp_path, name, content, expected):
    for f in tokenizer.TOKENIZER_FILES:
        (tmp_path / f).write_bytes((tok_dir / f).read_bytes())
    target = tmp_path / name
    target.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError, match=expected):
        tokenizer.Tokenizer(tmp_path)


def test_merge_line_of_three_symbols_rejected(tok_dir, tmp_path):
    (tmp_path / "vocab.json").write_bytes((tok_dir / "vocab.json").read_bytes())
    lines = (tok_dir / "merges.txt").read_text(encoding="utf-8").split("\n")
    lines[5] += " x"
    (tmp_path / "merges.txt").write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(ValueError, match="merges of two symbols"):
        tokenizer.Tokenizer(tmp_path)


def test_special_ids_checked(tok_dir, tmp_path):
    vocab = json.loads((tok_dir / "vocab.json").read_text(encoding="utf-8"))
    vocab["<|endoftext|>"], vocab["<|startoftext|>"] = 49406, 49407
    (tmp_path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (tmp_path / "merges.txt").write_bytes((tok_dir / "merges.txt").read_bytes())
    with pytest.raises(ValueError, match="<\\|startoftext\\|> = 49406"):
        tokenizer.Tokenizer(tmp_path)
