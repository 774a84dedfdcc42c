"""Rebuild ``vocab.json`` and ``merges.txt`` (CLIP's BPE, as HF's ``CLIPTokenizer`` reads them).

Provenance: OpenAI CLIP's ``bpe_simple_vocab_16e6.txt.gz`` (MIT), as redistributed inside the
``open_clip_torch`` wheel on PyPI.  Recipe, identical to OpenAI's ``simple_tokenizer.py``: the 256
byte tokens, their ``</w>`` forms, the first 48894 merges joined, then ``<|startoftext|>`` and
``<|endoftext|>`` -> 49408 tokens.  Offline use only; run by hand when the files need rebuilding::

    pip download --no-deps open_clip_torch -d /tmp/oc
    unzip -o /tmp/oc/open_clip_torch-*.whl open_clip/bpe_simple_vocab_16e6.txt.gz -d /tmp/oc
    python build_clip_tokenizer.py /tmp/oc/open_clip/bpe_simple_vocab_16e6.txt.gz
"""
import gzip
import json
import os
import sys

N_MERGES = 49152 - 256 - 2  # OpenAI's slice: merges[1 : 49152 - 256 - 2 + 1]


def bytes_to_unicode() -> dict[int, str]:
    """OpenAI's reversible byte -> printable-unicode table (GPT-2's)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def build(bpe_gz: str, out_dir: str) -> None:
    lines = gzip.open(bpe_gz).read().decode("utf-8").split("\n")
    merges = lines[1 : N_MERGES + 1]
    vocab = list(bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408 and len(set(vocab)) == 49408
    with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({tok: i for i, tok in enumerate(vocab)}, f, ensure_ascii=False)
    with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")


if __name__ == "__main__":
    build(sys.argv[1], os.path.dirname(os.path.abspath(__file__)))
