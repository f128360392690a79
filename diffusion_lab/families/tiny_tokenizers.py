"""Tokenizers for the tiny checkpoints, written in code (nothing is downloaded): CLIP's and Qwen's byte-level BPE over
the byte alphabet (so any text tokenizes) plus whole-word merges for the words of the bundled prompts, and T5's
SentencePiece unigram over those words and single characters. Each is saved like its hub counterpart."""

import json
from pathlib import Path

from transformers import CLIPTokenizer

WORDS = [
    "a",
    "photo",
    "of",
    "the",
    "an",
    "handwritten",
    "digit",
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "number",
    "flower",
    "type",
    "picture",
    "painting",
    "red",
    "blue",
    "green",
    "yellow",
    "white",
    "black",
]


def _byte_alphabet() -> list[str]:
    """GPT-2 / CLIP byte-to-unicode table: every byte gets a printable character."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = printable[:], 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return [chr(code) for code in codes]


def write_tiny_clip_tokenizer(directory: Path) -> CLIPTokenizer:
    """vocab.json + merges.txt for a CLIP BPE tokenizer over the byte alphabet and WORDS."""
    alphabet = _byte_alphabet()
    vocab_tokens = alphabet + [symbol + "</w>" for symbol in alphabet]
    merges = []
    for word in WORDS:  # merge left to right: "p h o t o</w>" -> "ph" -> "pho" -> ... -> "photo</w>"
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append(f"{pieces[0]} {pieces[1]}")
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
            vocab_tokens.append(pieces[0])
    vocab_tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {}
    for token in vocab_tokens:
        vocab.setdefault(token, len(vocab))
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    unique_merges = list(dict.fromkeys(merges))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(unique_merges) + "\n")
    return CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=77)


def write_tiny_t5_tokenizer(directory: Path):
    """A T5 (SentencePiece unigram) tokenizer over WORDS and single characters, built in code (no `spiece.model`
    download) and saved like a hub one: pad 0, eos 1, unk 2, as T5's."""
    import string

    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + word, -1.0) for word in WORDS]
    vocab += [(char, -5.0) for char in string.ascii_lowercase + string.digits + string.punctuation]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0)
    tokenizer.save_pretrained(directory)
    return tokenizer


QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def write_tiny_qwen_tokenizer(directory: Path):
    """A Qwen2 byte-level BPE tokenizer over the byte alphabet and WORDS (with Qwen's leading-space pieces), its
    chat markers as special tokens and a ChatML template, as Qwen3's."""
    from transformers import Qwen2Tokenizer

    alphabet = _byte_alphabet()
    vocab_tokens, merges = list(alphabet), []
    space = alphabet[ord(" ")]  # "Ġ"
    for word in WORDS:
        for piece in (word, space + word):
            symbols = list(piece)
            while len(symbols) > 1:
                merges.append((symbols[0], symbols[1]))
                symbols = [symbols[0] + symbols[1], *symbols[2:]]
                vocab_tokens.append(symbols[0])
    vocab = {}
    for token in vocab_tokens:
        vocab.setdefault(token, len(vocab))
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=list(dict.fromkeys(merges)))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    tokenizer.save_pretrained(directory)
    return tokenizer
