"""
Sample from a trained model (any variant) or from pretrained GPT-2.

    python sample.py                                  # from out/ckpt.pt
    python sample.py --out_dir=out-mod --start="ROMEO:" --num_samples=3
    python sample.py --init_from=gpt2 --start=FILE:prompt.txt
    python sample.py --show_depth=True                # shade each token by the depth it used
"""

import math
import sys
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from checkpoint import data_dir, is_gpt2_weights, load_model, pick_device, pretrained, read_meta
from configurator import build, fail, parse_value, read_flags


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

    def __post_init__(self):
        for flag in ("num_samples", "max_new_tokens"):
            if getattr(self, flag) < 1:
                raise ValueError(f"--{flag} must be at least 1, got {getattr(self, flag)}")
        if self.temperature < 0 or self.top_k < 0:
            raise ValueError("--temperature and --top_k must be >= 0")


def parse_args(argv):
    known = {f.name: f for f in fields(SampleConfig)}
    values = {}
    for key, text in read_flags(argv, __doc__, [("sampling", SampleConfig)]).items():
        if key not in known:
            fail(f"unknown flag --{key}. Valid flags: {', '.join(known)}")
        values[key] = parse_value(text, known[key])
    return build(SampleConfig, values)


def load(cfg):
    """(model, dataset name or None) from a checkpoint or the hub."""
    if cfg.init_from != "resume" and is_gpt2_weights(cfg.init_from):
        return pretrained(cfg.init_from), None
    model, ckpt = load_model(cfg.out_dir if cfg.init_from == "resume" else cfg.init_from)
    return model, ckpt.get("config", {}).get("dataset")


def tokenizer(dataset):
    """The dataset's characters when it has a vocabulary file (meta.json), else GPT-2 BPE."""
    meta = read_meta(data_dir(dataset)) if dataset else None
    if meta is not None:
        stoi, itos = meta["stoi"], meta["itos"]

        def encode(s):
            unknown = sorted({c for c in s if c not in stoi})
            if unknown:
                fail(f"--start: the prompt has characters this model never saw: {unknown}")
            return [stoi[c] for c in s]

        return encode, lambda ids: "".join(itos[i] for i in ids)
    import tiktoken
    enc = tiktoken.get_encoding("gpt2")
    return (lambda s: enc.encode(s, allowed_special={"<|endoftext|>"})), enc.decode


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
    model, dataset = load(cfg)
    model.eval().to(device)
    encode, decode = tokenizer(dataset)
    start = cfg.start
    if start.startswith("FILE:"):
        path = Path(start[5:])
        if not path.exists():
            fail(f"--start: no prompt file at {path}")
        start = path.read_text(encoding="utf-8")
    ids = encode(start)
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
