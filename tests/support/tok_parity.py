#!/usr/bin/env python3
"""What Python's `tokenizers` and `transformers` make of a tokenizer.json; prints JSON.

The Rust tests (policies/tests/tokenizer.rs) compare medzero's tokenizer, which
runs on the Rust `tokenizers` crate, with the Python libraries models ship for.

Usage:

  tok_parity.py TOKENIZER_JSON TEXTS_JSON
      TEXTS_JSON holds a list of strings. Prints
        {"ids": [[int]], "decoded": [str],          # tokenizers.Tokenizer
         "hf_ids": [[int]], "hf_decoded": [str]}    # transformers fast tokenizer
      ids come from encode(text, add_special_tokens=False) and decoded from
      decode(ids, skip_special_tokens=True), with truncation and padding off
      (as medzero's Tokenizer has them).

  tok_parity.py --train-bpe TEXTS_JSON OUT_DIR
      Trains a small byte-level BPE tokenizer shaped like Qwen2's (NFC,
      Qwen2's split regex, ByteLevel, special tokens after the learned
      vocabulary) on the texts and writes OUT_DIR/tokenizer.json and
      OUT_DIR/tokenizer_config.json (eos_token "<|im_end|>" as a string,
      pad_token "<|endoftext|>" in the {"content": ...} form). Prints
      {"vocab_size": int}.

  tok_parity.py --chat TOKENIZER_JSON CONVERSATIONS_JSON
      CONVERSATIONS_JSON holds a list of message lists ({"role", "content"}).
      Prints the list of prompts transformers' apply_chat_template renders
      with Qwen2's chat template and add_generation_prompt=True.
"""

import json
import os
import sys

from tokenizers import Regex, Tokenizer, decoders, models, normalizers
from tokenizers import pre_tokenizers, processors, trainers

# Qwen2's tokenizer.json: pre-tokenizer split pattern and chat template.
QWEN2_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def load_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def hf_tokenizer(tokenizer_json):
    # Imported here: transformers is slow to import and only two modes need it.
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=tokenizer_json)


def encode(tokenizer_json, texts_json):
    texts = load_json(texts_json)
    tok = Tokenizer.from_file(tokenizer_json)
    tok.no_truncation()
    tok.no_padding()
    ids = [tok.encode(t, add_special_tokens=False).ids for t in texts]
    decoded = [tok.decode(i, skip_special_tokens=True) for i in ids]
    hf = hf_tokenizer(tokenizer_json)
    hf_ids = [hf.encode(t, add_special_tokens=False) for t in texts]
    hf_decoded = [
        hf.decode(i, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        for i in hf_ids
    ]
    return {"ids": ids, "decoded": decoded, "hf_ids": hf_ids, "hf_decoded": hf_decoded}


def train_bpe(texts_json, out_dir):
    texts = load_json(texts_json)
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=1000,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    # As in Qwen2, the special tokens follow the learned vocabulary.
    tok.add_special_tokens(SPECIALS)
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    config = {
        "eos_token": "<|im_end|>",
        "pad_token": {
            "__type": "AddedToken",
            "content": "<|endoftext|>",
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        },
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    return {"vocab_size": tok.get_vocab_size(with_added_tokens=True)}


def chat(tokenizer_json, conversations_json):
    hf = hf_tokenizer(tokenizer_json)
    return [
        hf.apply_chat_template(
            messages,
            chat_template=QWEN2_CHAT_TEMPLATE,
            tokenize=False,
            add_generation_prompt=True,
        )
        for messages in load_json(conversations_json)
    ]


def main(argv):
    if len(argv) == 3 and not argv[1].startswith("--"):
        out = encode(argv[1], argv[2])
    elif len(argv) == 4 and argv[1] == "--train-bpe":
        out = train_bpe(argv[2], argv[3])
    elif len(argv) == 4 and argv[1] == "--chat":
        out = chat(argv[2], argv[3])
    else:
        sys.exit(__doc__)
    json.dump(out, sys.stdout, ensure_ascii=True)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main(sys.argv)
