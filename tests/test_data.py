"""
Data preparation: downloads fail with a message a user can act on, interrupted downloads
resume, and the token files decode back to the text they came from.

Everything is served from a small HTTP server on 127.0.0.1 that the tests fill themselves.
"""

import hashlib
import http.server
import importlib.util
import io
import lzma
import os
import socket
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import requests
import tiktoken

from checkpoint import read_meta

ROOT = Path(__file__).resolve().parents[1]


def load_script(name, relative_path):
    spec = importlib.util.spec_from_file_location(name, ROOT / relative_path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # Pool workers look tokenize() up by its module's name
    spec.loader.exec_module(module)
    return module


shakespeare = load_script("shakespeare_char_prepare", "data/shakespeare_char/prepare.py")
openwebtext = load_script("openwebtext_prepare", "data/openwebtext/prepare.py")

TEXT = "".join(f"line {i}: the quick brown fox jumps over {i % 7} lazy dogs.\n" for i in range(40))  # synthetic


class RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves server.files (path -> bytes); answers 'Range: bytes=N-' with a 206 unless told not to."""

    def do_GET(self):
        self.server.seen.append((self.path, self.headers.get("Range")))
        body = self.server.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        start, byte_range = 0, self.headers.get("Range")
        if byte_range and self.server.honor_range:
            start = int(byte_range.removeprefix("bytes=").split("-")[0])
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        self.wfile.write(body[start:])

    def log_message(self, *args):
        pass  # keep test output quiet


@pytest.fixture(autouse=True)
def no_proxy_for_localhost(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")  # a proxy in the environment must not see the tests


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    httpd.files, httpd.seen, httpd.honor_range = {}, [], True
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    threading.Thread(target=httpd.serve_forever, args=(0.01,), daemon=True).start()  # short poll: fast shutdown
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- shakespeare_char

def read_split(out_dir):
    train = np.fromfile(out_dir / "train.bin", dtype=np.uint16)
    val = np.fromfile(out_dir / "val.bin", dtype=np.uint16)
    return train, val, read_meta(out_dir)


def test_shakespeare_download_gives_90_10_split_whose_ids_decode_back_to_the_text(server, tmp_path, monkeypatch):
    server.files["/input.txt"] = TEXT.encode()
    monkeypatch.setattr(shakespeare, "SHA256", hashlib.sha256(TEXT.encode()).hexdigest())
    shakespeare.main(["--url", server.url + "/input.txt", "--out_dir", str(tmp_path)])

    train, val, meta = read_split(tmp_path)
    assert len(train) == int(0.9 * len(TEXT)) and len(train) + len(val) == len(TEXT)
    assert meta["vocab_size"] == len(set(TEXT)) == len(meta["itos"]) == len(meta["stoi"])
    assert shakespeare.decode(np.concatenate([train, val]), meta["itos"]) == TEXT
    assert (tmp_path / "input.txt").read_text() == TEXT  # kept, so the next run needs no network


def test_shakespeare_checksum_mismatch_exits_with_a_message_and_writes_nothing(server, tmp_path, capsys):
    server.files["/input.txt"] = TEXT.encode()  # not the real file: its digest differs from SHA256
    with pytest.raises(SystemExit) as exit_info:
        shakespeare.main(["--url", server.url + "/input.txt", "--out_dir", str(tmp_path)])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert "Checksum mismatch" in message and "--input path/to/input.txt" in message
    assert list(tmp_path.iterdir()) == []


def test_shakespeare_unreachable_server_prints_how_to_supply_the_file_without_a_traceback(tmp_path):
    script = ROOT / "data/shakespeare_char/prepare.py"
    url = f"http://127.0.0.1:{closed_port()}/input.txt"
    env = dict(os.environ, NO_PROXY="127.0.0.1,localhost")
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, str(script), "--url", url, "--out_dir", str(out)],
                            capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 2
    assert "--input path/to/input.txt" in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1  # one line: what failed, the file, the command
    assert "input.txt" in result.stderr.split("--input")[0]
    assert not out.exists()  # a failed download creates no folder


def test_shakespeare_input_flag_reads_the_local_file_and_never_downloads(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("--input must not download")
    monkeypatch.setattr(requests, "get", no_network)
    local = tmp_path / "my_copy.txt"
    local.write_text(TEXT)
    shakespeare.main(["--input", str(local), "--out_dir", str(tmp_path / "out")])

    train, val, meta = read_split(tmp_path / "out")
    assert shakespeare.decode(np.concatenate([train, val]), meta["itos"]) == TEXT


def shakespeare_refuses(args, capsys):
    """prepare.py's stderr line for args, which must end it with exit code 2."""
    with pytest.raises(SystemExit) as exit_info:
        shakespeare.main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1, err
    return err


def test_shakespeare_out_dir_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "afile").write_text("mine")
    local = tmp_path / "input.txt"
    local.write_text(TEXT)
    for out_dir in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        err = shakespeare_refuses(["--input", str(local), "--out_dir", str(out_dir)], capsys)
        assert "--out_dir" in err and "is a file" in err
    assert (tmp_path / "afile").read_text() == "mine"


@pytest.mark.parametrize("text, why", [
    ("", "too few"), ("a", "too few"), ("0123456789", "too few"),
    ("".join(map(chr, range(0x20000, 0x20000 + 65537))), "65,536"),
], ids=["empty", "one character", "ten characters", "65537 distinct characters"])
def test_shakespeare_input_that_cannot_make_token_files_is_refused(tmp_path, capsys, text, why):
    local = tmp_path / "input.txt"
    local.write_text(text, encoding="utf-8")
    err = shakespeare_refuses(["--input", str(local), "--out_dir", str(tmp_path / "out")], capsys)
    assert why in err and "--input" in err
    assert not (tmp_path / "out").exists()


def test_shakespeare_eleven_characters_are_enough_for_two_val_tokens(tmp_path):
    local = tmp_path / "input.txt"
    local.write_text("0123456789A")
    shakespeare.main(["--input", str(local), "--out_dir", str(tmp_path / "out")])
    train, val, _ = read_split(tmp_path / "out")
    assert (len(train), len(val)) == (9, 2)


# ---------------------------------------------------------------- openwebtext

REVISION = "test-revision"
SUBSET00 = f"/datasets/Skylion007/openwebtext/resolve/{REVISION}/subsets/urlsf_subset00.tar"


def tiny_encoding():
    """A byte-level tokenizer (256 byte tokens + <|endoftext|>): GPT-2's BPE needs a download."""
    return tiktoken.Encoding(name="bytes_with_eot", pat_str=r"\S+|\s+",
                             mergeable_ranks={bytes([i]): i for i in range(256)},
                             special_tokens={"<|endoftext|>": 256})


def tar_bytes(members, compress=None):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def subset_tar(docs, docs_per_xz=4):
    """The hub's layout: a tar of .xz members, each an xz-compressed tar of .txt documents."""
    xz_members = []
    for start in range(0, len(docs), docs_per_xz):
        part = start // docs_per_xz + 1
        inner = tar_bytes([(f"{part:07d}-{i}.txt", doc.encode()) for i, doc in enumerate(docs[start:start + docs_per_xz])])
        xz_members.append((f"openwebtext/urlsf_subset00-{part}_data.xz", lzma.compress(inner)))
    return tar_bytes(xz_members)


DOCS = [f"Document {i}: the café opened at {i} o'clock.\nSecond line of {i}." for i in range(10)]


def documents_in(path, enc):
    """Split a token file at end-of-text tokens and decode each document."""
    ids = np.memmap(path, dtype=np.uint16, mode="r").tolist()
    assert ids == [] or ids[-1] == enc.eot_token  # every document ends with one
    docs, current = [], []
    for token in ids:
        if token == enc.eot_token:
            docs.append(enc.decode(current))
            current = []
        else:
            current.append(token)
    return docs


def test_openwebtext_tokens_decode_back_to_the_documents_each_followed_by_eot(server, tmp_path):
    server.files[SUBSET00] = subset_tar(["  " + d + "\n" for d in DOCS])  # stripped, as the hub's loader does
    enc = tiny_encoding()
    counts = openwebtext.prepare(tmp_path, subsets=1, revision=REVISION, base_url=server.url,
                                 num_proc=2, val_fraction=0.0, enc=enc)

    assert documents_in(tmp_path / "train.bin", enc) == DOCS
    assert counts == {"train": sum(len(d.encode()) + 1 for d in DOCS), "val": 0}
    assert os.path.getsize(tmp_path / "val.bin") == 0


def test_openwebtext_val_split_holds_whole_documents_and_does_not_depend_on_num_proc(server, tmp_path):
    docs = [f"doc {i} " * (i + 1) for i in range(40)]
    docs = [d.strip() for d in docs]
    server.files[SUBSET00] = subset_tar(docs)
    enc, splits = tiny_encoding(), []
    for num_proc in (1, 2):
        out = tmp_path / f"proc{num_proc}"
        openwebtext.prepare(out, subsets=1, revision=REVISION, base_url=server.url,
                            num_proc=num_proc, val_fraction=0.3, enc=enc)
        splits.append(((out / "train.bin").read_bytes(), (out / "val.bin").read_bytes()))
        train, val = documents_in(out / "train.bin", enc), documents_in(out / "val.bin", enc)
        assert train and val and sorted(train + val) == sorted(docs)
    assert splits[0] == splits[1]


def test_partial_download_is_completed_with_a_range_request_and_gives_identical_bytes(server, tmp_path):
    body = subset_tar(DOCS)
    server.files[SUBSET00] = body
    dest = tmp_path / "urlsf_subset00.tar"
    (tmp_path / "urlsf_subset00.tar.part").write_bytes(body[:1000])  # an interrupted earlier run
    openwebtext.download(server.url + SUBSET00, str(dest))

    assert server.seen == [(SUBSET00, "bytes=1000-")]
    assert dest.read_bytes() == body
    assert not (tmp_path / "urlsf_subset00.tar.part").exists()


def test_a_server_that_ignores_range_restarts_the_download_from_scratch(server, tmp_path):
    body = subset_tar(DOCS)
    server.files[SUBSET00], server.honor_range = body, False
    dest = tmp_path / "urlsf_subset00.tar"
    (tmp_path / "urlsf_subset00.tar.part").write_bytes(b"x" * 1000)  # would corrupt the file if appended to
    openwebtext.download(server.url + SUBSET00, str(dest))
    assert dest.read_bytes() == body


def test_openwebtext_missing_subset_exits_naming_the_revision_flag_and_zenodo(server, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        openwebtext.main(["--subsets", "1", "--revision", "no-such-revision", "--base_url", server.url,
                          "--out_dir", str(tmp_path), "--num_proc", "1"])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert "404" in message and "--revision" in message and "Zenodo" in message and "3834942" in message
    assert server.seen[0][0].endswith("/resolve/no-such-revision/subsets/urlsf_subset00.tar")


def openwebtext_refuses(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        openwebtext.main(args + ["--subsets", "1", "--num_proc", "1"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1, err
    return err


def test_openwebtext_out_dir_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "afile").write_text("mine")
    for out_dir in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        err = openwebtext_refuses(["--out_dir", str(out_dir), "--base_url", "http://127.0.0.1:9"],
                                  capsys)
        assert "--out_dir" in err and "is a file" in err
    assert (tmp_path / "afile").read_text() == "mine"


def test_openwebtext_failed_download_is_one_line_and_removes_the_folders_it_made(tmp_path, capsys):
    url = f"http://127.0.0.1:{closed_port()}"
    err = openwebtext_refuses(["--out_dir", str(tmp_path / "new" / "out"), "--base_url", url], capsys)
    assert "Could not download" in err and "resume" in err
    assert list(tmp_path.iterdir()) == []


def test_openwebtext_failed_download_keeps_an_earlier_part_file(tmp_path, capsys):
    part = tmp_path / "downloads" / "urlsf_subset00.tar.part"
    part.parent.mkdir()
    part.write_bytes(b"x" * 1000)  # an interrupted earlier run, to resume from
    url = f"http://127.0.0.1:{closed_port()}"
    openwebtext_refuses(["--out_dir", str(tmp_path), "--base_url", url], capsys)
    assert part.read_bytes() == b"x" * 1000


def test_openwebtext_missing_subset_removes_the_empty_downloads_folder(server, tmp_path, capsys):
    openwebtext_refuses(["--out_dir", str(tmp_path), "--base_url", server.url], capsys)
    assert list(tmp_path.iterdir()) == []
