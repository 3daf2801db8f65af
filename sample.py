"""
Sample from a trained model (any variant) or from pretrained GPT-2.

    python sample.py                                  # from out/ckpt.pt
    python sample.py --out_dir=out-mod --start="ROMEO:" --num_samples=3
    python sample.py --init_from=gpt2 --start=FILE:prompt.txt
    python sample.py --show_depth=True                # shade each token by the depth it used
    python sample.py --bpe_ranks=gpt2.tiktoken        # GPT-2 BPE offline, from a local file
"""

import base64
import math
import sys
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from checkpoint import data_dir, is_gpt2_weights, load_model, pick_device, pretrained
from configurator import build, fail, parse_value, read_flags
from dataset import char_vocabulary
from gpt2_weights import looks_like_path

GPT2_VOCAB = 50257  # GPT-2's BPE: 50,256 byte-level tokens and <|endoftext|>


@dataclass
class SampleConfig:
    init_from: str = "resume"  # resume (out_dir's checkpoint) | a checkpoint | gpt2 | gpt2-xl ...
    out_dir: str = "out"  # the run whose checkpoint --init_from=resume loads
    start: str = "\n"  # the prompt, or FILE:path to read it from a file
    num_samples: int = 3  # samples to print, one after the other
    max_new_tokens: int = 500  # tokens generated per sample
    temperature: float = 0.8  # 1.0 = as trained, lower = more conservative
    top_k: int = 200  # keep only the top_k most likely tokens (0 = all)
    seed: int = 1337  # the sampling's random numbers
    device: str = "auto"  # auto | cpu | cuda | cuda:1 | mps
    use_cache: bool = True  # KV cache: the prompt runs once, then one position per token
    show_depth: bool = False  # shade each token by how much of the network it used
    bpe_ranks: str = ""  # GPT-2 BPE from a local ranks file in tiktoken's format (offline)

    def __post_init__(self):
        for flag in ("num_samples", "max_new_tokens"):
            if getattr(self, flag) < 1:
                raise ValueError(f"--{flag} must be at least 1, got {getattr(self, flag)}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"--temperature must be a finite number >= 0 (0 = greedy), "
                             f"got {self.temperature}")
        if self.top_k < 0:
            raise ValueError("--top_k must be >= 0")
        if not 0 <= self.seed < 2**63:  # what torch.manual_seed takes, as in train.py
            raise ValueError(f"--seed must be in [0, 2**63 - 1], got {self.seed}")


def parse_args(argv):
    known = {f.name: f for f in fields(SampleConfig)}
    values = {}
    for key, text in read_flags(argv, __doc__, [("sampling", SampleConfig)]).items():
        if key not in known:
            fail(f"unknown flag --{key}. Valid flags: {', '.join(known)}")
        values[key] = parse_value(text, known[key])
    return build(SampleConfig, values)


def load(cfg):
    """(model, its characters (id -> character) or None, GPT-2's BPE or None) from a checkpoint
    or the hub. Before a download of weights the tokenizer comes first: offline, it fails too."""
    if cfg.init_from != "resume" and is_gpt2_weights(cfg.init_from):
        downloads = not (Path(cfg.init_from).exists() or looks_like_path(cfg.init_from))
        encoding = gpt2_encoding(cfg.bpe_ranks) if downloads else None
        model = pretrained(cfg.init_from)
        return model, None, encoding or gpt2_encoding(cfg.bpe_ranks)
    model, ckpt = load_model(cfg.out_dir if cfg.init_from == "resume" else cfg.init_from)
    itos = vocabulary(ckpt, model.config.vocab_size)
    if itos is not None and cfg.bpe_ranks:
        fail(f"--bpe_ranks: this checkpoint is a character model with its own {len(itos)} "
             f"characters; leave --bpe_ranks out")
    return model, itos, (gpt2_encoding(cfg.bpe_ranks) if itos is None else None)


def vocabulary(ckpt, vocab):
    """The characters the checkpoint keeps. An older checkpoint keeps none: its dataset's
    meta.json is read, and refused when it cannot be the model's (a model from scratch on
    characters has exactly one embedding per character, a BPE model at least GPT2_VOCAB)."""
    if "itos" in ckpt:
        return ckpt["itos"]
    dataset = ckpt.get("config", {}).get("dataset")
    itos = char_vocabulary(dataset) if dataset else None
    if vocab < GPT2_VOCAB and len(itos or []) != vocab:
        found = f"{len(itos)} characters" if itos else "no meta.json"
        place = data_dir(dataset) if dataset else "the checkpoint's dataset (unnamed)"
        fail(f"{place} holds {found}, not the {vocab} characters this "
             f"checkpoint was trained on: prepare that dataset as it was (checkpoints trained "
             f"from now on keep their characters)")
    return itos


def tokenizer(itos, enc, vocab, bpe_ranks=""):
    """(encode, decode) with the model's characters, else GPT-2's BPE enc. An id past the
    tokenizer's (GPT-2's padding to 50304, never trained on) decodes as U+FFFD."""
    if itos is not None:
        stoi = {ch: i for i, ch in enumerate(itos)}

        def encode(s):
            unknown = sorted({c for c in s if c not in stoi})
            if unknown:
                fail(f"--start: the prompt has characters this model never saw: {unknown}")
            return [stoi[c] for c in s]

        return encode, lambda ids: "".join(itos[i] if i < len(itos) else "\ufffd" for i in ids)
    if enc.n_vocab > vocab:
        fail(f"{bpe_ranks or 'GPT-2 BPE'} has {enc.n_vocab} tokens, more than the model's "
             f"{vocab}: pass the --bpe_ranks the model was trained with")

    def decode(ids):
        pieces = (enc.decode_single_token_bytes(i) if i < enc.n_vocab else "\ufffd".encode()
                  for i in ids)
        return b"".join(pieces).decode("utf-8", errors="replace")

    return (lambda s: enc.encode(s, allowed_special="all")), decode


# GPT-2's pre-tokenizer split (tiktoken's r50k_base pattern): contractions, letters, digits,
# other symbols, each with an optional leading space; then whitespace
GPT2_SPLIT = (r"'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)"
              r"|\s")


def gpt2_encoding(bpe_ranks):
    """tiktoken's GPT-2 encoding: downloaded (then cached) by tiktoken, or built as tiktoken
    builds it (GPT-2's split, <|endoftext|> after the last rank) from the local ranks file
    --bpe_ranks."""
    import tiktoken
    if bpe_ranks:
        ranks = read_ranks(Path(bpe_ranks))
        return tiktoken.Encoding("gpt2_local", pat_str=GPT2_SPLIT, mergeable_ranks=ranks,
                                 special_tokens={"<|endoftext|>": len(ranks)})
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # offline, a proxy, a bad cache: whatever the download raised
        fail(f"GPT-2's BPE could not be loaded (tiktoken downloads it once: "
             f"{e.__class__.__name__}); offline, pass --bpe_ranks=PATH to GPT-2's ranks in "
             f"tiktoken's format (r50k_base.tiktoken)")


def read_ranks(path):
    """{token bytes: rank}, one 'base64-token rank' per line: tiktoken's .tiktoken format, read
    as tiktoken.load.load_tiktoken_bpe reads it but without copying the file into its cache."""
    try:
        lines = path.read_bytes().splitlines()
    except OSError as e:
        fail(f"--bpe_ranks: cannot read {path} ({e.strerror})")
    ranks = {}
    for n, line in enumerate(lines, 1):
        try:
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:
            fail(f"--bpe_ranks: line {n} of {path} is not 'base64-token rank' (tiktoken's format)")
    if sorted(ranks.values()) != list(range(len(ranks))):
        fail(f"--bpe_ranks: the ranks of {path} are not 0 .. N-1, each once")
    if any(bytes([b]) not in ranks for b in range(256)):
        fail(f"--bpe_ranks: {path} lacks some of the 256 one-byte tokens: not byte-level BPE ranks")
    return ranks


def read_prompt(start):
    """--start, or the UTF-8 text of the file it names as FILE:path."""
    if not start.startswith("FILE:"):
        return start
    path = Path(start[5:])
    if not path.exists():
        fail(f"--start: no prompt file at {path}")
    if path.is_dir():
        fail(f"--start: {path} is a folder; name a text file in it")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        fail(f"--start: {path} is not UTF-8 text (byte {e.start}); save the prompt as UTF-8")
    except OSError as e:
        fail(f"--start: cannot read {path} ({e.strerror})")


SHADES = [236, 240, 244, 248, 252, 255]  # ANSI 256-colour greys: darker = less of the network


BARS = " ▁▂▃▄▅▆▇█"  # without colour: a bar under each character, taller = deeper


def level_of(d, levels):
    """The entry of levels for depth d in [0, 1], or None for NaN (a token never run)."""
    return None if math.isnan(d) else levels[min(len(levels) - 1, int(d * (len(levels) - 1) + 0.5))]


def shade(pieces, depths, colour):
    """Text with each token coloured by its depth; without a terminal, each line of text is
    followed by a line of bars, one under each character, as tall as its token's depth. A token
    decoding never ran (depth NaN: the last one) keeps the terminal's colour, or gets no bar."""
    if colour:
        out = []
        for piece, d in zip(pieces, depths):
            level = level_of(d, SHADES)
            out.append(f"\033[0m{piece}" if level is None else f"\033[38;5;{level}m{piece}")
        return "".join(out) + "\033[0m"
    lines, text, bars = [], "", ""
    for piece, d in zip(pieces, depths):
        for ch in piece:
            if ch == "\n":
                lines += [text, bars]
                text, bars = "", ""
            else:
                text += ch
                bars += level_of(d, BARS) or " "
    return "\n".join(lines + [text, bars])


def main(argv):
    cfg = parse_args(argv)
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model, itos, encoding = load(cfg)
    model.eval().to(device)
    encode, decode = tokenizer(itos, encoding, model.config.vocab_size, cfg.bpe_ranks)
    ids = encode(read_prompt(cfg.start))
    if not ids:
        fail("--start: the prompt is empty: pass at least one character")
    x = torch.tensor(ids, dtype=torch.long, device=device)[None, :]
    colour = sys.stdout.isatty()
    if cfg.show_depth and colour:
        legend = "".join(f"\033[38;5;{s}m█" for s in SHADES)
        print(f"depth: shallow {legend}\033[0m full")
    for _ in range(cfg.num_samples):
        cache = model.new_cache() if cfg.use_cache else None
        y = model.generate(x, cfg.max_new_tokens, cfg.temperature, cfg.top_k or None,
                           cfg.use_cache, cache)
        if cfg.show_depth:
            show_depth(model, y, x.size(1), cache, decode, colour)
        else:
            print(decode(y[0].tolist()))
        print("---------------")


def show_depth(model, y, prompt_len, cache, decode, colour):
    """The sample shaded by depth, its mean depth, and its KV cache against a dense model's."""
    tokens = y[0].tolist()
    depths = model.depth_per_token(y, prompt_len=prompt_len)[0].tolist()
    print(shade([decode([t]) for t in tokens], depths, colour))
    generated = [d for d in depths[prompt_len:] if not math.isnan(d)]  # NaN: never run
    mean = sum(generated) / max(1, len(generated))
    print(f"mean depth per generated token: {mean:.3f} of the network")
    if cache is not None:
        held = min(len(tokens) - 1, model.config.block_size)  # the last token was never run
        c = model.config
        dense = 2 * c.n_layer * held * c.n_embd * next(model.parameters()).element_size()
        used = model.kv_cache_nbytes(cache)
        print(f"KV cache: {used / 1024:.1f} KiB vs {dense / 1024:.1f} KiB for a dense model of "
              f"the same dims ({used / dense:.2f}x)")


if __name__ == "__main__":
    main(sys.argv[1:])
