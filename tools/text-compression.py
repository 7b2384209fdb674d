#!/usr/bin/env python3
"""How much would compressing each message's text save on disk, on text
people wrote? (Issue 11: ≤ 150 bytes per 100-byte message.)

The benches' texts are the alphabet repeated, which any compressor
shrinks to nothing, so a compression figure from them would be a lie.
This measures instead, offline, on the conversations of the PyPI package
`chatterbot-corpus` (short human-written dialogue lines in 28 languages;
small talk, not customer service): each message compressed on its own,
as a log record would be, with zstd

- without a dictionary (a 100-byte text has little to compress against
  itself),
- with one dictionary trained on the other half of the corpus (the
  conversation files of each language split in two), as a store would
  train one on its first messages and keep it,
- and with a dictionary per language, trained on that language's other
  half (a store serving one market).

A compressed text costs no framing here (zstd's magicless format, no
checksum, size or dictionary id: the record's flags and the store would
say which dictionary), and a text that does not shrink is stored as it
is: what is reported is min(raw, compressed) per message.

Two message shapes: each line as it is (mostly 10-60 bytes), and
"~100-byte" messages made of a conversation's consecutive lines joined
until they reach 100 bytes (the benches' size).

Usage: tools/text-compression.py [--dict-bytes N] [--level L] [--json FILE]
Makes its own venv (target/venv-compress) with zstandard and PyYAML, and
downloads the corpus with pip (no other network).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import zipfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(REPO, "target"))
VENV = os.path.join(TARGET, "venv-compress")
CORPUS = "chatterbot-corpus==1.3.3"


def in_venv():
    py = os.path.join(VENV, "bin", "python")
    if os.path.realpath(sys.prefix) == os.path.realpath(VENV):
        return
    if not os.path.exists(py):
        subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
    subprocess.run([py, "-m", "pip", "install", "-q", "zstandard==0.23.0", "PyYAML"], check=True)
    os.execv(py, [py, *sys.argv])


def corpus_files():
    """(language, file name, [conversation = [line]]) for every file."""
    import yaml

    where = tempfile.mkdtemp(prefix="kefu-corpus-")
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", where, CORPUS], check=True)
    wheel = [f for f in os.listdir(where) if f.endswith(".whl")][0]
    out = []
    with zipfile.ZipFile(os.path.join(where, wheel)) as z:
        for name in sorted(z.namelist()):
            if not name.endswith(".yml") or "/data/" not in name:
                continue
            doc = yaml.safe_load(z.read(name).decode("utf-8"))
            convs = []
            for conv in (doc or {}).get("conversations") or []:
                lines = [str(x).strip() for x in (conv if isinstance(conv, list) else [conv]) if str(x).strip()]
                if lines:
                    convs.append(lines)
            lang = name.split("/data/")[1].split("/")[0]
            out.append((lang, name, convs))
    return out


def messages(convs, shape):
    for lines in convs:
        if shape == "line":
            yield from (line.encode("utf-8") for line in lines)
            continue
        joined = b""
        for line in lines:
            joined = (joined + b" " + line.encode("utf-8")) if joined else line.encode("utf-8")
            if len(joined) >= 100:
                yield joined
                joined = b""
        if joined:
            yield joined


def measure(msgs, compressor):
    raw = stored = shrunk = 0
    for m in msgs:
        c = len(compressor.compress(m))
        raw += len(m)
        stored += min(len(m), c)
        shrunk += c < len(m)
    return raw, stored, shrunk


def main():
    in_venv()
    import zstandard as zstd

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dict-bytes", type=int, default=16384)
    ap.add_argument("--level", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args()

    files = corpus_files()
    # Alternate files between training and measuring, per language, so
    # both halves hold every language and no measured line trained.
    train, test = [], []
    seen = {}
    for lang, name, convs in files:
        k = seen.get(lang, 0)
        seen[lang] = k + 1
        (train if k % 2 else test).append((lang, name, convs))

    params = zstd.ZstdCompressionParameters.from_level(
        args.level,
        format=zstd.FORMAT_ZSTD1_MAGICLESS,
        write_checksum=False,
        write_content_size=False,
        write_dict_id=False,
    )
    plain = zstd.ZstdCompressor(compression_params=params)

    def dictionary(fs, shape):
        samples = [m for _, _, c in fs for m in messages(c, shape)]
        d = zstd.train_dictionary(args.dict_bytes, samples, level=args.level)
        return zstd.ZstdCompressor(dict_data=d, compression_params=params)

    rows = []
    for shape in ("line", "100"):
        shared = dictionary(train, shape)
        for group in ("all", "english", "chinese", "japanese", "spanish"):
            fs = test if group == "all" else [f for f in test if f[0] == group]
            msgs = [m for _, _, c in fs for m in messages(c, shape)]
            raw, stored_plain, _ = measure(msgs, plain)
            _, stored_shared, _ = measure(msgs, shared)
            row = {
                "shape": shape,
                "group": group,
                "messages": len(msgs),
                "text_bytes_per_msg": raw / len(msgs),
                "stored_no_dict": stored_plain / len(msgs),
                "stored_shared_dict": stored_shared / len(msgs),
            }
            if group != "all":
                own = dictionary([f for f in train if f[0] == group], shape)
                row["stored_own_dict"] = measure(msgs, own)[1] / len(msgs)
            rows.append(row)
    print(f"zstd level {args.level}, magicless; dictionaries of {args.dict_bytes} B trained on the other half")
    print("| messages | texts | count | text B/msg | no dictionary | one dictionary | the language's own | saved per 100 B, best |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        own = r.get("stored_own_dict")
        best = min(x for x in (r["stored_no_dict"], r["stored_shared_dict"], own) if x is not None)
        print(
            f"| {'each line' if r['shape'] == 'line' else '~100 bytes'} | {r['group']} | {r['messages']:,} "
            f"| {r['text_bytes_per_msg']:.1f} | {r['stored_no_dict']:.1f} | {r['stored_shared_dict']:.1f} "
            f"| {'' if own is None else f'{own:.1f}'} | {100 * (1 - best / r['text_bytes_per_msg']):.1f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
