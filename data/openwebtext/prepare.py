"""
OpenWebText (Gokaslan and Cohen, 2019) as GPT-2 tokens, without the `datasets` library.

The hub repository Skylion007/openwebtext serves the corpus as 21 tar files,
subsets/urlsf_subset00.tar .. urlsf_subset20.tar (about 630 MB each). Each holds `.xz`
members, and each member is an xz-compressed tar of `.txt` documents. This script downloads
them (resumable), unpacks the documents, tokenizes them with GPT-2's BPE in parallel, and
writes train.bin / val.bin like nanoGPT: uint16 token ids, each document followed by
<|endoftext|> (50256). All 21 subsets give about 9B tokens (train.bin about 17 GB); one gives
about a twentieth of that.

    python data/openwebtext/prepare.py --subsets 1 --num_proc 8

If the hub changes layout, the original archive is on Zenodo (record 3834942,
openwebtext.tar.xz, about 12 GB); it holds the same `.xz` members of documents.
"""

import argparse
import lzma
import os
import sys
import tarfile
from multiprocessing import Pool

import numpy as np
import requests

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = "Skylion007/openwebtext"
N_SUBSETS = 21
DOCS_PER_TASK = 256  # documents a worker tokenizes per task: large enough to hide the pickling


class DownloadError(Exception):
    """A download that failed in a way the user can fix; main prints it without a traceback."""


def stop(message):
    """A user's problem (a failed download, an unreadable file): the message on stderr, exit code
    2, no traceback (the project's rule for bad input)."""
    print(message, file=sys.stderr)
    sys.exit(2)


# what a 404 from the hub most likely means, and the way around it
MOVED_HINT = (f"The hub repository {REPO} has changed layout over time: pass --revision with a "
              "commit that still has subsets/, or use the original archive on Zenodo "
              "(record 3834942, openwebtext.tar.xz).")


def subset_url(base_url, revision, i):
    return f"{base_url}/datasets/{REPO}/resolve/{revision}/subsets/urlsf_subset{i:02d}.tar"


def download(url, dest, timeout=60, chunk_size=1 << 20):
    """Stream url into dest. Bytes land in dest + '.part' first; a later run resumes from there."""
    if os.path.exists(dest):
        return dest
    part = dest + ".part"
    have = os.path.getsize(part) if os.path.exists(part) else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    try:
        with requests.get(url, headers=headers, stream=True, timeout=timeout) as response:
            if response.status_code == 404:
                raise DownloadError(f"{url} was not found (404). {MOVED_HINT}")
            if response.status_code == 416:  # .part is complete or longer than the file: start over
                os.remove(part)
                return download(url, dest, timeout, chunk_size)
            response.raise_for_status()
            resumed = (response.status_code == 206 and
                       response.headers.get("Content-Range", "").startswith(f"bytes {have}-"))
            if not resumed:  # a 200 (server ignored Range) is the whole file again
                have = 0
            total = have + int(response.headers.get("Content-Length", 0))
            done, last_report = have, 0
            with open(part, "ab" if resumed else "wb") as f:
                for chunk in response.iter_content(chunk_size):
                    f.write(chunk)
                    done += len(chunk)
                    if done - last_report >= 50e6 or done == total:
                        print(f"\r{os.path.basename(dest)}: "
                              f"{done / 1e6:,.0f} / {total / 1e6:,.0f} MB", end="", flush=True)
                        last_report = done
            print()
    except requests.RequestException as e:  # the class name: urllib3's own text runs to lines
        reason = (f"HTTP {e.response.status_code}" if e.response is not None
                  else e.__class__.__name__)
        raise DownloadError(f"Could not download {url} ({reason}); run again to resume, or "
                            f"pass --base_url with a mirror") from None
    if total and done != total:
        raise DownloadError(f"Download of {url} stopped at {done:,} of {total:,} bytes; "
                            "run again to resume.")
    os.replace(part, dest)
    return dest


def documents(subset_tar):
    """Yield the text of every .txt document inside one urlsf_subsetNN.tar, in archive order."""
    with tarfile.open(subset_tar) as outer:
        for member in outer:
            if not (member.isfile() and member.name.endswith(".xz")):
                continue
            with lzma.open(outer.extractfile(member)) as xz:
                with tarfile.open(fileobj=xz, mode="r|") as inner:
                    for doc in inner:  # stream mode: each document is read as the walk reaches it
                        if doc.isfile() and doc.name.endswith(".txt"):
                            # strip, as the hub's own loader does, so token counts match nanoGPT's
                            raw = inner.extractfile(doc).read()
                            yield raw.decode("utf-8", errors="replace").strip()


def batches(iterable, size):
    batch = []
    for item in iterable:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


_enc = None  # each worker's tokenizer, set once by the Pool initializer


def _set_encoding(enc):
    global _enc
    _enc = enc


def tokenize(docs):
    """One uint16 array per document: its tokens, then the end-of-text token."""
    return [np.array(_enc.encode_ordinary(d) + [_enc.eot_token], dtype=np.uint16) for d in docs]


def download_subsets(out_dir, subsets, revision, base_url):
    """Download the first `subsets` tar files into out_dir/downloads; return their paths."""
    downloads = os.path.join(out_dir, "downloads")
    os.makedirs(downloads, exist_ok=True)
    return [download(subset_url(base_url, revision, i),
                     os.path.join(downloads, f"urlsf_subset{i:02d}.tar"))
            for i in range(subsets)]


def prepare(out_dir=HERE, subsets=N_SUBSETS, revision="main", base_url="https://huggingface.co",
            num_proc=8, val_fraction=0.0005, enc=None, seed=2357):
    """Download `subsets` tar files, then write out_dir/train.bin and out_dir/val.bin."""
    tars = download_subsets(out_dir, subsets, revision, base_url)
    if enc is None:
        import tiktoken
        enc = tiktoken.get_encoding("gpt2")  # fetches GPT-2's BPE files once, then caches them
    assert enc.n_vocab <= 2**16, "token ids must fit in uint16"

    def all_documents():
        for path in tars:
            yield from documents(path)

    # Each document goes to val with probability val_fraction, drawn here in document order so
    # the split does not depend on --num_proc. Files are appended as raw uint16, which is
    # exactly what np.memmap(dtype=np.uint16) reads back; the .tmp names keep a crashed run
    # from looking done.
    rng = np.random.default_rng(seed)
    paths = {split: os.path.join(out_dir, f"{split}.bin") for split in ("train", "val")}
    files = {split: open(path + ".tmp", "wb") for split, path in paths.items()}
    counts = {"train": 0, "val": 0}
    n_docs = 0
    with Pool(num_proc, initializer=_set_encoding, initargs=(enc,)) as pool:
        tokenized = pool.imap(tokenize, batches(all_documents(), DOCS_PER_TASK))
        for step, token_lists in enumerate(tokenized):
            for ids, is_val in zip(token_lists, rng.random(len(token_lists)) < val_fraction):
                split = "val" if is_val else "train"
                ids.tofile(files[split])
                counts[split] += len(ids)
            n_docs += len(token_lists)
            if step % 100 == 0:
                print(f"\r{n_docs:,} documents, {counts['train'] + counts['val']:,} tokens",
                      end="", flush=True)
    for split, f in files.items():
        f.close()
        os.replace(f.name, paths[split])
    print(f"\n{n_docs:,} documents: train has {counts['train']:,} tokens, "
          f"val has {counts['val']:,} -> {out_dir}")
    return counts


def new_folders(out_dir):
    """The folders a run creates for out_dir/downloads, deepest first; stops if out_dir is a
    file or lies under one."""
    folder, missing = os.path.abspath(os.path.join(out_dir, "downloads")), []
    while not os.path.exists(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        stop(f"--out_dir {out_dir}: {folder} is a file, not a folder; pick another --out_dir")
    return missing


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subsets", type=int, default=N_SUBSETS,
                        help=f"how many of the {N_SUBSETS} tar files to use (default: %(default)s)")
    # No commit hash that still has subsets/ is pinned here, so the default follows the branch;
    # if the hub's layout changes, a 404 says so and --revision pins an older commit.
    parser.add_argument("--revision", default="main",
                        help="hub branch or commit of the dataset (default: %(default)s)")
    parser.add_argument("--base_url", default="https://huggingface.co",
                        help="the hub, or a mirror of it (default: %(default)s)")
    parser.add_argument("--num_proc", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                        help="tokenizer processes (default: half the CPUs, %(default)s here)")
    parser.add_argument("--val_fraction", type=float, default=0.0005,
                        help="share of documents held out (default: %(default)s)")
    parser.add_argument("--out_dir", default=HERE,
                        help="where train.bin / val.bin (and downloads/) go (default: %(default)s)")
    args = parser.parse_args(argv)
    if not 1 <= args.subsets <= N_SUBSETS:
        parser.error(f"--subsets must be in [1, {N_SUBSETS}], got {args.subsets}")
    if args.num_proc < 1:
        parser.error(f"--num_proc must be >= 1, got {args.num_proc}")
    if not 0 <= args.val_fraction < 1:
        parser.error(f"--val_fraction must be in [0, 1), got {args.val_fraction}")
    created = new_folders(args.out_dir)
    try:
        prepare(args.out_dir, args.subsets, args.revision, args.base_url.rstrip("/"),
                args.num_proc, args.val_fraction)
    except DownloadError as e:
        for folder in created:  # left empty by the failure; a .part to resume from keeps its own
            if not os.listdir(folder):
                os.rmdir(folder)
        stop(str(e))


if __name__ == "__main__":
    main()
