"""Regenerate tests/data/tokenizer_oracle.json: CLIP token ids as the original UniDiffuser stack
produced them, for prompts full of what scraped and pasted text carries.

The original (thu-ml/unidiffuser, libs/clip.py FrozenCLIPEmbedder) tokenized with transformers
4.23.1's slow CLIPTokenizer while ftfy 6.1.1 was installed. This script runs in a side environment
with exactly that stack and never imports this project, so the ids are an independent oracle:

    python3.11 -m venv /tmp/oracle-venv
    /tmp/oracle-venv/bin/pip install transformers==4.23.1 ftfy==6.1.1
    /tmp/oracle-venv/bin/pip install --no-deps openai-clip==1.0.1
    /tmp/oracle-venv/bin/python tests/data/make_tokenizer_oracle.py tests/data/tokenizer_oracle.json

vocab.json / merges.txt are built from OpenAI's own SimpleTokenizer (its `encoder` and
`bpe_ranks`, read from the openai-clip package's BPE file). The same SimpleTokenizer also encodes
every prompt; where its ids differ from the original's (it unescapes HTML twice, on the whole
prompt) the prompt is listed under "simple_tokenizer_differs" with both id lists.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import platform
import sys
import tempfile
from pathlib import Path

PINNED = {"transformers": "4.23.1", "ftfy": "6.1.1"}

LONG = ("a highly detailed matte painting of a sprawling futuristic city at dusk, neon lights reflecting "
        "on wet streets, flying cars, towering skyscrapers with holographic billboards, crowds of people "
        "with umbrellas, steam rising from vents, cinematic lighting, volumetric fog, ultra wide angle, "
        "trending on artstation, octane render, 8k, by greg rutkowski and syd mead")

# (category, prompt). Invisible characters are written as escapes so the list reads unambiguously.
PROMPTS = [
    ("ordinary", "a photo of a cat"),
    ("ordinary", "an astronaut riding a horse on the moon"),
    ("ordinary", "A red bicycle leaning against a brick wall."),
    ("ordinary", "Portrait of an old fisherman, oil on canvas"),
    ("ordinary", "two dogs playing in the snow, golden hour"),
    ("ordinary", "a bowl of ramen with a soft-boiled egg"),
    ("ordinary", "The Eiffel Tower at night"),
    ("ordinary", "watercolor sketch of a lighthouse by the sea"),
    ("ordinary", "isometric pixel art of a tiny island"),
    ("ordinary", "A Corgi wearing Sunglasses, studio photo"),
    ("ordinary", "close-up macro shot of a dew drop on a leaf"),
    ("ordinary", "cyberpunk samurai, digital art, highly detailed"),
    ("html", "fish &amp; chips"),
    ("html", "a &quot;quoted&quot; word"),
    ("html", "rock &#39;n&#39; roll"),
    ("html", "&lt;b&gt;bold&lt;/b&gt; text"),
    ("html", "<b>bold</b> &amp; bright"),
    ("html", "<p>a cat on a mat</p>"),
    ("html", "a < b &amp; c"),
    ("html", "Tom &amp;amp; Jerry"),
    ("html", "caf&eacute; au lait"),
    ("html", "5 &lt; 6 &gt; 4"),
    ("html", "&nbsp;non-breaking entity"),
    ("html", "&AMP; uppercase entity"),
    ("html", "&#x27;hex entity&#x27;"),
    ("html", "&copy; 2023 all rights reserved"),
    ("html", "AT&T logo, a&b"),
    ("html", "&ampersand and &amp"),
    ("html", "<i>italic</i> &lt;tag&gt;"),
    ("html", "&amp;lt;double escaped&amp;gt;"),
    ("mojibake", "cafÃ©"),
    ("mojibake", "donâ€™t stop"),
    ("mojibake", "naÃ¯ve art"),
    ("mojibake", "â€œquotedâ€\x9d text"),
    ("mojibake", "Ã  la carte"),
    ("mojibake", "SÃ£o Paulo skyline"),
    ("mojibake", "Ã¼ber cool"),
    ("mojibake", "æ—¥æœ¬ mojibake japanese"),
    ("mojibake", "cafÃƒÂ© double encoded"),
    ("mojibake", "Ð¼Ð¾Ñ\x81ÐºÐ²Ð° russian"),
    ("mojibake", "Ã¢â‚¬â„¢ triple"),
    ("mojibake", "CAFÃ‰ UPPER"),
    ("quotes", "don\u2019t look back"),
    ("quotes", "\u201chello world\u201d"),
    ("quotes", "\u2018single quotes\u2019"),
    ("quotes", "it\u2032s a prime"),
    ("quotes", "\u00abguillemets\u00bb"),
    ("quotes", "\u201eGerman quotes\u201c"),
    ("quotes", "the dog\u2019s bone, the cats\u2019 toys"),
    ("quotes", "``latex quotes''"),
    ("fullwidth", "\uff21\uff22\uff23\u3000\uff46\uff55\uff4c\uff4c\uff57\uff49\uff44\uff54\uff48"),
    ("fullwidth", "\uff11\uff12\uff13 cats"),
    ("fullwidth", "\uff43\uff41\uff54\uff01"),
    ("fullwidth", "\uff76\uff80\uff76\uff85 halfwidth katakana"),
    ("ligatures", "\ufb01sh and \ufb02ower"),
    ("ligatures", "o\ufb00ice \ufb03 \ufb04"),
    ("ligatures", "\u0132sselmeer \u01c5 \ufb06"),
    ("control", "a\x00cat"),
    ("control", "bell\x07 ringing"),
    ("control", "esc \x1b[31mred\x1b[0m text"),
    ("control", "\x7f delete char"),
    ("control", "c1 \x85 next line"),
    ("control", "\x80\x9f c1 range"),
    ("control", "soft\u00adhyphen"),
    ("control", "\ufeffbyte order mark"),
    ("control", "vertical\x0btab form\x0cfeed"),
    ("whitespace", "a\tcat\twith\ttabs"),
    ("whitespace", "line one\nline two\r\nline three\rfour"),
    ("whitespace", "many     spaces   between"),
    ("whitespace", "   leading and trailing   "),
    ("whitespace", "line\u2028separator\u2029paragraph"),
    ("whitespace", "ideographic\u3000space"),
    ("whitespace", "non\u00a0breaking\u00a0space"),
    ("whitespace", "zero\u200bwidth\u200bspace"),
    ("whitespace", "zero\u200dwidth\u200cjoiners"),
    ("whitespace", "thin\u2009space and\u202fnarrow"),
    ("greek", "\u039f\u0394\u03a5\u03a3\u03a3\u0395\u03a5\u03a3"),
    ("greek", "\u03a3\u039f\u03a6\u039f\u03a3 \u03a3"),
    ("greek", "\u1f48\u0394\u03a5\u03a3\u03a3\u0395\u038e\u03a3 with accents"),
    ("greek", "\u03b1\u03b2\u03b3 lowercase greek"),
    ("turkish", "\u0130stanbul at night"),
    ("turkish", "D\u0130YARBAKIR and \u0131 dotless"),
    ("german", "Stra\u00dfe in Berlin"),
    ("german", "STRASSE and \u1e9e capital sharp s"),
    ("emoji", "a \U0001f431 cat"),
    ("emoji", "\U0001f468\u200d\U0001f469\u200d\U0001f467 family"),
    ("emoji", "\U0001f1ef\U0001f1f5 flag"),
    ("emoji", "thumbs \U0001f44d\U0001f3fd up"),
    ("emoji", "red heart \u2764\ufe0f"),
    ("emoji", "\U0001f600\U0001f601\U0001f602\U0001f923 faces"),
    ("cjk", "\u4e00\u53ea\u732b"),
    ("cjk", "\u732b\u306e\u5199\u771f"),
    ("cjk", "\uace0\uc591\uc774 \uc0ac\uc9c4"),
    ("cjk", "a cat \u732b in tokyo \u6771\u4eac"),
    ("combining", "caf\u00e9 precomposed"),
    ("combining", "cafe\u0301 decomposed"),
    ("combining", "n\u0303 and \u00f1"),
    ("combining", "A\u030angstr\u00f6m and \u212b sign"),
    ("combining", "\u2126 ohm and \u212a kelvin"),
    ("combining", "Z\u0351\u036b\u0343\u036a\u0302\u036b\u033d\u034f\u0334\u0319\u0324\u031e\u0349alg\u0308o text"),
    ("scripts", "\u0645\u0631\u062d\u0628\u0627 arabic"),
    ("scripts", "\u05e9\u05dc\u05d5\u05dd hebrew"),
    ("scripts", "\u0928\u092e\u0938\u094d\u0924\u0947 hindi"),
    ("scripts", "\u0e2a\u0e27\u0e31\u0e2a\u0e14\u0e35 thai"),
    ("scripts", "\u041f\u0440\u0438\u0432\u0435\u0442 \u041c\u0438\u0440"),
    ("long", "cat " * 100),
    ("long", LONG),
    ("long", LONG + ", " + LONG),
    ("long", "\U0001f431" * 40),
    ("long", "supercalifragilisticexpialidocious " * 10),
    ("long", "a " * 74 + "photograph"),
    ("empty", ""),
    ("empty", " "),
    ("empty", "\n\t "),
    ("empty", "\u200b"),
    ("empty", "\x00"),
    ("empty", "."),
    ("empty", "&nbsp;"),
    ("numbers", "1234567890"),
    ("numbers", "3.14159 and 2,718"),
    ("numbers", "$19.99, 50% off, #1"),
    ("numbers", "!!!??? ... -- ---"),
    ("numbers", "(a) [b] {c} <d>"),
    ("numbers", "C++ and e-mail and snake_case"),
    ("numbers", "#hashtag @user https://example.com/a?b=c&d=e"),
    ("numbers", "\u00bd cup, x\u00b2, \u2167 roman"),
    ("numbers", "\u0663\u0664 arabic-indic digits, \u0969 devanagari"),
    ("numbers", "1920x1080 4k 60fps f/1.8"),
    ("special", "<|endoftext|>"),
    ("special", "a cat <|endoftext|> a dog"),
    ("special", "<|startoftext|>hello"),
    ("special", "<|ENDOFTEXT|> upper"),
    ("special", "<|endoftext|><|endoftext|>"),
    ("special", "&lt;|endoftext|&gt; escaped"),
    ("special", "<|endoftext |> broken"),
    ("special", "fish &amp; chips <|endoftext|> a < b &amp; c"),
    ("special", "<b>bold</b> <|endoftext|> &amp; more"),
    ("special", "caf\u00c3 <|endoftext|>\u00a9"),
    ("contractions", "it's what we're, we've, I'm, we'll, he'd"),
    ("contractions", "IT'S WE'RE I'M WE'LL HE'D DON'T"),
    ("contractions", "rock'n'roll o'clock y'all"),
    ("contractions", "'s alone and cats' toys"),
    ("contractions", "it\u2019s and it\u2018s"),
    ("contractions", "don''t triple'''quote"),
    ("surrogates", "\ud83d\ude00 surrogate pair"),
    ("surrogates", "lone \ud800 surrogate"),
]


def load_simple_tokenizer():
    """OpenAI's clip/simple_tokenizer.py, loaded by path: clip/__init__ needs torchvision."""
    spec = importlib.util.find_spec("clip")
    folder = Path(spec.submodule_search_locations[0])
    mod_spec = importlib.util.spec_from_file_location("clip_simple_tokenizer", folder / "simple_tokenizer.py")
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod.SimpleTokenizer(str(folder / "bpe_simple_vocab_16e6.txt.gz"))


def frame(body: list[int], start: int, end: int) -> list[int]:
    """FrozenCLIPEmbedder's layout, applied to SimpleTokenizer's ids for a like-for-like comparison."""
    ids = [start] + body[:75] + [end]
    return ids + [end] * (77 - len(ids))


def main(out: Path, any_version: bool) -> None:
    versions = {name: importlib.metadata.version(name)
                for name in ("transformers", "tokenizers", "ftfy", "regex", "wcwidth", "openai-clip")}
    wrong = {k: versions[k] for k, v in PINNED.items() if versions[k] != v}
    if wrong and not any_version:
        sys.exit(f"this oracle must run with {PINNED}, found {wrong} (pass --any-version to override)")
    versions["python"] = platform.python_version()

    from transformers import CLIPTokenizer

    simple = load_simple_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "vocab.json").write_text(json.dumps(simple.encoder, ensure_ascii=False), encoding="utf-8")
        merges = sorted(simple.bpe_ranks, key=simple.bpe_ranks.get)
        Path(tmp, "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                           encoding="utf-8")
        tok = CLIPTokenizer.from_pretrained(tmp)
    assert tok.fix_text is not None, "ftfy is not importable: the slow CLIPTokenizer would fall back to BERT cleaning"
    start, end = tok.bos_token_id, tok.eos_token_id
    assert (start, end, tok.pad_token_id) == (49406, 49407, 49407)

    cases, differs = [], []
    for category, prompt in PROMPTS:
        # exactly FrozenCLIPEmbedder.forward's call, one prompt at a time (batching does not change ids)
        enc = tok(prompt, truncation=True, max_length=77, return_length=True,
                  return_overflowing_tokens=False, padding="max_length")
        ids = enc["input_ids"]
        assert len(ids) == 77
        cases.append({"category": category, "prompt": prompt, "ids": ids})
        try:
            simple_ids = frame(simple.encode(prompt), start, end)
        except Exception as e:  # noqa: BLE001 - recorded, not hidden
            simple_ids = f"{type(e).__name__}: {e}"
        if simple_ids != ids:
            differs.append({"category": category, "prompt": prompt, "ids": ids, "simple_ids": simple_ids})

    doc = {
        "about": "CLIP ids of the original UniDiffuser stack (transformers slow CLIPTokenizer + ftfy), called "
                 "as FrozenCLIPEmbedder does: truncation=True, max_length=77, return_length=True, "
                 "return_overflowing_tokens=False, padding='max_length'. Regenerate with "
                 "tests/data/make_tokenizer_oracle.py.",
        "versions": versions,
        "simple_tokenizer_note": "OpenAI's clip SimpleTokenizer ids framed like the original "
                                 "(<|startoftext|>, 75 ids, <|endoftext|>, padded with <|endoftext|>; "
                                 "clip.tokenize itself pads with 0), listed only where they differ.",
        "cases": cases,
        "simple_tokenizer_differs": differs,
    }
    # one case per line: reviewable diffs
    lines = ["{"]
    for key in ("about", "versions", "simple_tokenizer_note"):
        lines.append(f" {json.dumps(key)}: {json.dumps(doc[key])},")
    for key in ("cases", "simple_tokenizer_differs"):
        body = ",\n".join("  " + json.dumps(c) for c in doc[key])
        lines.append(f" {json.dumps(key)}: [\n{body}\n ]" + ("," if key == "cases" else ""))
    lines.append("}")
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    json.loads(out.read_text(encoding="utf-8"))
    print(f"{out}: {len(cases)} prompts, {len(differs)} where SimpleTokenizer differs; {versions}")


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--any-version"]
    if len(args) != 1:
        sys.exit("usage: make_tokenizer_oracle.py OUT.json [--any-version]")
    main(Path(args[0]), "--any-version" in sys.argv)
