"""CLIP BPE ids of openai/clip-vit-large-patch14, rebuilt offline from the openai-clip package."""
import logging

import pytest

from unidiffuser import tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    tokenizer.write_tokenizer_files(folder)
    return tokenizer.Tokenizer(folder)


def test_known_ids(tok):
    ids = tok(["a photo of a cat"])
    assert ids.shape == (1, 77)
    assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert (ids[0, 7:] == 49407).all()


def test_vocabulary_size_and_specials(tok):
    ids = tok(["Hello World!! café 123"])[0].tolist()
    # lower-cased, punctuation runs kept together, digits split one by one
    assert ids[:9] == [49406, 3306, 1002, 748, 15304, 272, 273, 274, 49407]
    assert max(tok._tok.get_vocab().values()) == 49407


def test_batch_and_empty_prompt(tok):
    ids = tok(["", "a cat"])
    assert ids[0, :2].tolist() == [49406, 49407] and (ids[0, 2:] == 49407).all()
    assert ids[1, :4].tolist() == [49406, 320, 2368, 49407]


def test_long_prompt_truncated_with_warning(tok, caplog):
    with caplog.at_level(logging.WARNING, logger="unidiffuser"):
        ids = tok(["cat " * 100])
    assert ids.shape == (1, 77) and ids[0, 0] == 49406 and ids[0, -1] == 49407
    assert (ids[0, 1:76] == 2368).all()
    assert "cut" in caplog.text


def test_missing_files_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        tokenizer.Tokenizer(tmp_path)
