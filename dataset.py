"""
The token files train.py reads: a prepared dataset folder (train.bin and val.bin, uint16
tokens), its vocabulary size, and batches of context windows drawn from it.
"""

import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from checkpoint import data_dir, read_meta
from configurator import fail


def ensure_data(dataset):
    """Stop with instructions if the dataset has not been prepared (Shakespeare prepares itself)."""
    folder = data_dir(dataset)
    if (folder / "train.bin").exists() and (folder / "val.bin").exists():
        return
    prepare = folder / "prepare.py"
    if dataset == "shakespeare_char" and prepare.exists():
        print("data/shakespeare_char is not prepared yet: preparing it now")
        if subprocess.run([sys.executable, str(prepare)]).returncode != 0:
            raise SystemExit(2)  # prepare.py printed its own one-line reason
        return
    if prepare.exists():
        fail(f"--dataset {dataset}: {folder}/train.bin and val.bin are missing; "
             f"run `python {prepare}` first")
    known = sorted(p.parent.name for p in (Path(__file__).parent / "data").glob("*/prepare.py"))
    fail(f"--dataset {dataset}: no {folder}/train.bin and val.bin; use one of {', '.join(known)} "
         f"or a folder holding train.bin and val.bin")


def vocab_size(dataset):
    """The dataset's characters (meta.json), else GPT-2's vocabulary padded to a multiple of 64."""
    meta = read_meta(data_dir(dataset))
    return meta["vocab_size"] if meta else 50304


def char_vocabulary(dataset):
    """The dataset's characters as a list (id -> character) for its checkpoints to keep, so that
    sampling never depends on the folder again; None for GPT-2 BPE datasets."""
    meta = read_meta(data_dir(dataset))
    return None if meta is None else [ch for _, ch in sorted(meta["itos"].items())]


class Batches:
    """Windows of a uint16 token file. The generator is shared by all processes so that every
    rank draws the same global batch and takes its own slice (DDP == one process). With
    `samples` > 0, training reads epochs over the first `samples` windows of train.bin, each
    window once per epoch (the official router-tuning recipe); else random windows anywhere."""

    def __init__(self, dataset, block_size, batch_size, device, seed, samples=0):
        self.files = {s: data_dir(dataset) / f"{s}.bin" for s in ("train", "val")}
        self.block_size, self.batch_size, self.device = block_size, batch_size, device
        self.samples = samples
        self.itos = char_vocabulary(dataset)  # read once: the ids this run trains on
        self.generator = torch.Generator().manual_seed(seed)
        # this epoch's windows, and the next one to take
        self.order, self.position = torch.empty(0, dtype=torch.long), 0
        for split, path in self.files.items():
            if path.stat().st_size % 2:
                fail(f"{path} has an odd number of bytes: not a file of uint16 tokens; "
                     f"prepare the dataset again")
            n = path.stat().st_size // 2
            if n <= block_size:
                fail(f"{path} holds {n} tokens, fewer than block_size + 1 = {block_size + 1}; "
                     f"use a smaller --block_size or more data")

    def tokens(self, split):
        return np.memmap(self.files[split], dtype=np.uint16, mode="r")  # reopen: memmaps leak

    def check_vocabulary(self, model_vocab):
        """Every token id must have an embedding (a strided sample of very large files)."""
        for split, path in self.files.items():
            data = self.tokens(split)
            top = int(data[:: max(1, len(data) // 50_000_000)].max())
            if top >= model_vocab:
                fail(f"{path} holds token id {top}, beyond the model's vocabulary of "
                     f"{model_vocab}: is --dataset the one this model was trained on?")

    def offsets(self, split, n, generator=None):
        if split == "train" and self.samples and generator is None:
            return self.epoch_offsets(n)
        high = len(self.tokens(split)) - self.block_size
        return torch.randint(high, (n,), generator=generator or self.generator)

    def epoch_offsets(self, n):
        windows = min(self.samples, (len(self.tokens("train")) - 1) // self.block_size)
        taken, count = [], 0
        while count < n:
            if self.position >= len(self.order):  # a new epoch: every window once, fresh order
                self.order, self.position = torch.randperm(windows, generator=self.generator), 0
            take = self.order[self.position:self.position + n - count]
            taken.append(take)
            count += len(take)
            self.position += len(take)
        return torch.cat(taken) * self.block_size

    def fetch(self, split, offsets):
        data = self.tokens(split)
        T = self.block_size
        x = torch.stack([torch.from_numpy(data[i:i + T].astype(np.int64)) for i in offsets])
        y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + T].astype(np.int64)) for i in offsets])
        if self.device.startswith("cuda"):
            return (x.pin_memory().to(self.device, non_blocking=True),
                    y.pin_memory().to(self.device, non_blocking=True))
        return x.to(self.device), y.to(self.device)

    def state(self):
        return {"data": self.generator.get_state(), "order": self.order, "position": self.position}

    def load_state(self, state):
        self.generator.set_state(state["data"])
        self.order, self.position = state.get("order", self.order), state.get("position", 0)
