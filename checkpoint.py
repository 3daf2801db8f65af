"""
What train.py writes and sample.py / bench.py read: checkpoints, the dataset folders, and
the device. Every loader reports a bad file in one line (configurator.fail).

A checkpoint (`out_dir/ckpt.pt`, read with weights_only=True) is a dict:
    model         the state dict (router-tuning: only the routers)
    model_args    GPTConfig fields
    variant       a name in variants.VARIANTS; variant_args its settings dataclass as a dict
    config        train.py's TrainConfig as a dict (resume restores it)
    optimizer, iter_num, best_val_loss, val_loss, rng    what resuming needs
    base          only for models that train part of a dense one: where the rest lives
    itos          the characters of a character dataset (id -> character), None for GPT-2 BPE;
                  older checkpoints lack it, and sample.py reads their dataset's meta.json
"""

import hashlib
import json
import os
import pickle
from dataclasses import fields
from pathlib import Path

import torch

from configurator import build, fail
from model import GPT, GPTConfig
from variants import VARIANTS


# --- datasets ----------------------------------------------------------------------------------

def data_dir(dataset):
    """A name under data/, or a path to any folder holding train.bin and val.bin."""
    return Path(dataset) if os.sep in dataset else Path(__file__).parent / "data" / dataset


class PlainDataUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, strings and numbers only: a crafted meta.pkl cannot run code,
    because running code needs a global (a function or class), and none is handed out."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"{module}.{name} is not plain data")


def read_meta(folder):
    """A character dataset's vocabulary {vocab_size, stoi, itos} (meta.json, or an old meta.pkl
    read as plain data only), or None for GPT-2 BPE datasets."""
    folder = Path(folder)
    try:
        if (folder / "meta.json").exists():
            meta = json.loads((folder / "meta.json").read_text())
            meta["itos"] = {int(i): ch for i, ch in meta["itos"].items()}  # JSON keys are strings
            return meta
        if (folder / "meta.pkl").exists():
            with open(folder / "meta.pkl", "rb") as f:
                return PlainDataUnpickler(f).load()
    except (OSError, ValueError, KeyError, AttributeError, pickle.UnpicklingError, EOFError) as e:
        fail(f"{folder}: its meta.json / meta.pkl is not a plain vocabulary "
             f"({e.__class__.__name__}); run the dataset's prepare.py again")
    return None


# --- checkpoints ---------------------------------------------------------------------------------

def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_checkpoint(path, payload):
    """Write to a temporary file, then rename: a crash never leaves a half-written checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def read_checkpoint(path):
    """(checkpoint dict, file path); a folder means its ckpt.pt."""
    path = Path(path)
    if path.is_dir() or (not path.exists() and not path.suffix):  # a run's folder
        path = path / "ckpt.pt"
    if not path.exists():
        fail(f"no checkpoint at {path}: train one first, or pass the right --out_dir / --init_from")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt, truncated, or pickled objects weights_only refuses
        fail(f"{path} is not a readable nanodepth checkpoint ({e.__class__.__name__}): it may be "
             f"truncated or corrupt; pass another checkpoint")
    if not isinstance(ckpt, dict) or not {"model", "model_args", "variant"} <= ckpt.keys():
        fail(f"{path} is not a nanodepth checkpoint (missing model, model_args or variant)")
    if ckpt["variant"] not in VARIANTS:
        fail(f"{path} holds variant {ckpt['variant']!r}, unknown to this version of nanodepth")
    return ckpt, path


def load_model(path, ckpt=None):
    """Rebuild any nanodepth checkpoint on the CPU: (model, checkpoint dict). Pass `ckpt` if
    the file was read already."""
    if ckpt is None:
        ckpt, path = read_checkpoint(path)
    cls, settings_cls = VARIANTS[ckpt["variant"]]
    settings = None
    if settings_cls:  # settings a newer version dropped are ignored (e.g. tune_samples)
        known = {f.name for f in fields(settings_cls)}
        stored = ckpt["variant_args"]
        settings = build(settings_cls, {k: v for k, v in stored.items() if k in known})
    if "base" in ckpt:  # only part of the model was trained; the rest lives in the base checkpoint
        if "pretrained" in ckpt["base"]:
            base = pretrained(ckpt["base"]["pretrained"])
        else:
            base_path = Path(ckpt["base"]["path"])
            if not base_path.exists():
                fail(f"{path} builds on {base_path}, which is missing")
            if file_sha256(base_path) != ckpt["base"]["sha256"]:
                fail(f"{base_path} changed since {path} was trained on it (sha256 differs)")
            base, _ = load_model(base_path)
        if ckpt["model_args"]["block_size"] < base.config.block_size:
            base.crop_block_size(ckpt["model_args"]["block_size"])
        model = cls.from_dense(base, settings)
        _, unexpected = model.load_state_dict(ckpt["model"], strict=False)
        if unexpected:
            fail(f"{path} does not fit its base model: unexpected tensors {unexpected[:3]}")
    else:
        model = cls(GPTConfig(**ckpt["model_args"]), settings)
        try:
            model.load_state_dict(ckpt["model"])
        except RuntimeError as e:
            fail(f"{path} does not match its own settings: {str(e).splitlines()[0]}")
    return model, ckpt


def is_gpt2_weights(init_from):
    """A hub name (gpt2, gpt2-medium, ..., or owner/name such as openai-community/gpt2), a
    .safetensors file, or a folder holding model.safetensors. A missing `run/ckpt.pt` is no hub
    name: it has a suffix."""
    path = Path(init_from)
    owner_name = (init_from.count("/") == 1 and not path.suffix
                  and not init_from.startswith((".", "/", "~")))
    hub_name = (init_from.startswith("gpt2") or owner_name) and not path.exists()
    return hub_name or path.suffix == ".safetensors" or (path / "model.safetensors").exists()


def pretrained(init_from, dropout=0.0):
    """GPT-2 weights in Hugging Face layout, or one line naming what went wrong."""
    try:
        return GPT.from_pretrained(init_from, dropout=dropout)
    except (OSError, ValueError, RuntimeError) as e:
        fail(f"--init_from {init_from}: {str(e).splitlines()[0]}")


def dense_model(init_from, dropout=0.0):
    """A trained GPT-2 to start from: GPT-2 weights (hub name, file, folder) or a checkpoint of
    the dense model."""
    if is_gpt2_weights(init_from):
        return pretrained(init_from, dropout)
    model, ckpt = load_model(init_from)
    if type(model) is not GPT:
        fail(f"--init_from {init_from} holds a {ckpt['variant']} model; a dense GPT is needed")
    return model


def pick_device(name):
    """auto: CUDA, then MPS, then CPU. An explicit device that is not there is a user error."""
    has_mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        fail(f"--device {name}: no CUDA GPU is visible to PyTorch; use --device=cpu (or auto)")
    if name.split(":")[0] == "mps" and not has_mps:
        fail(f"--device {name}: Apple's MPS backend is not available here; "
             f"use --device=cpu (or auto)")
    if name.split(":")[0] not in ("cpu", "cuda", "mps"):
        fail(f"--device must be auto, cpu, cuda, cuda:N, mps or mps:N, got {name!r}")
    return name
