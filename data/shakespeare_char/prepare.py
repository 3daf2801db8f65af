"""
Tiny Shakespeare at the character level (40,000 lines of Shakespeare, 1,115,394 bytes,
65 distinct characters).

    python data/shakespeare_char/prepare.py                          # download it (1.1 MB)
    python data/shakespeare_char/prepare.py --input path/to/input.txt  # or use a copy you have

Writes, next to this file (or in --out_dir):
    train.bin, val.bin   character ids as uint16, the first 90% and the last 10% of the text
    meta.json            {'vocab_size', 'itos', 'stoi'} to decode samples
                         (JSON: reading it runs no code)
"""

import argparse
import hashlib
import json
import os
import sys

import numpy as np
import requests

URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"  # of the file at URL
HERE = os.path.dirname(os.path.abspath(__file__))


class DownloadError(Exception):
    """A download that failed in a way the user can fix; main prints it without a traceback."""


def stop(message):
    """A user's problem (a failed download, an unreadable file): the message on stderr, exit code
    2, no traceback (the project's rule for bad input)."""
    print(message, file=sys.stderr)
    sys.exit(2)


def offline_hint(reason):
    """One line: what failed, and the command that works without internet."""
    return (f"{reason}; get that input.txt another way and run: "
            f"python data/shakespeare_char/prepare.py --input path/to/input.txt")


def download(url, sha256=SHA256, timeout=30):
    """The bytes at url, checked against sha256; the caller writes them (a failure writes
    nothing)."""
    try:
        response = requests.get(url, timeout=timeout)
        response.raise_for_status()
    except requests.RequestException as e:  # the class name: urllib3's own text runs to lines
        reason = (f"HTTP {e.response.status_code}" if e.response is not None
                  else e.__class__.__name__)
        raise DownloadError(offline_hint(f"Could not download {url} ({reason})")) from None
    digest = hashlib.sha256(response.content).hexdigest()
    if digest != sha256:
        raise DownloadError(offline_hint(
            f"Checksum mismatch for {url}: expected sha256 {sha256}, got {digest}"))
    return response.content


def build_vocab(text):
    chars = sorted(set(text))
    stoi = {ch: i for i, ch in enumerate(chars)}
    itos = {i: ch for i, ch in enumerate(chars)}
    return stoi, itos


def encode(text, stoi):
    return np.array([stoi[ch] for ch in text], dtype=np.uint16)


def decode(ids, itos):
    return "".join(itos[int(i)] for i in ids)


def split(ids, train_fraction=0.9):
    n = int(len(ids) * train_fraction)  # contiguous split: val is the end of the play text
    return ids[:n], ids[n:]


def write(out_dir, train_ids, val_ids, stoi, itos):
    os.makedirs(out_dir, exist_ok=True)
    train_ids.tofile(os.path.join(out_dir, "train.bin"))
    val_ids.tofile(os.path.join(out_dir, "val.bin"))
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump({"vocab_size": len(itos), "itos": itos, "stoi": stoi}, f)


def prepare(text, out_dir):
    stoi, itos = build_vocab(text)
    train_ids, val_ids = split(encode(text, stoi))
    write(out_dir, train_ids, val_ids, stoi, itos)
    print(f"length of dataset in characters: {len(text):,}")
    print(f"vocab size: {len(itos)}")
    print(f"train has {len(train_ids):,} tokens, val has {len(val_ids):,} tokens -> {out_dir}")
    return train_ids, val_ids, stoi, itos


def check_out_dir(out_dir):
    """--out_dir may be missing (it is created), but not a file or under one."""
    folder = os.path.abspath(out_dir)
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        stop(f"--out_dir {out_dir}: {folder} is a file, not a folder; pick another --out_dir")


def check_text(text, source):
    """Stop on a text that cannot become token files."""
    if len(set(text)) > 65536:
        stop(f"{source} has {len(set(text)):,} distinct characters; train.bin stores uint16 ids, "
             f"so at most 65,536 fit")
    # each split must hold a character and the next one to predict: 2 in val (the last 10%)
    if min(len(part) for part in split(text)) < 2:
        stop(f"{source} holds {len(text)} characters, too few: the val split (the last 10%) "
             f"needs at least 2, so give at least 11")


def read_text(path):
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        stop(f"Cannot read {path} as UTF-8 text ({e}); pass a text file with --input, or "
             f"delete a damaged download and run again")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", help="a local copy of input.txt (default: download it)")
    parser.add_argument("--url", default=URL,
                        help="where to download input.txt from (default: %(default)s)")
    parser.add_argument("--out_dir", default=HERE,
                        help="where train.bin / val.bin / meta.json go (default: %(default)s)")
    args = parser.parse_args(argv)
    check_out_dir(args.out_dir)
    kept = os.path.join(args.out_dir, "input.txt")  # an earlier download, checked back then
    if args.input is None and not os.path.exists(kept):
        try:
            data = download(args.url, SHA256)
        except DownloadError as e:
            stop(str(e))
        os.makedirs(args.out_dir, exist_ok=True)
        with open(kept, "wb") as f:  # kept, so the next run needs no network
            f.write(data)
    text = read_text(args.input or kept)
    check_text(text, f"--input {args.input}" if args.input else kept)
    prepare(text, args.out_dir)


if __name__ == "__main__":
    main()
