import json
import os

import numpy as np
import pytest

# kernels.py's Triton kernels run on the CPU in the tests, through Triton's interpreter. Triton
# reads this variable when it is first imported (it decorates its own library then) and again
# at launch, so it is set here, before any test module can import Triton through the code.
# TRITON_INTERPRET=0 in the environment keeps the real compiler (tests/test_cuda.py on a GPU).
os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def dataset(tmp_path):
    """A tiny character dataset: random tokens from a 16-symbol vocabulary, as prepare.py writes it."""
    folder = tmp_path / "chars"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 4000), ("val", 600)):
        rng.integers(0, 16, n).astype(np.uint16).tofile(folder / f"{split}.bin")
    chars = [chr(ord("a") + i) for i in range(16)]
    meta = {"vocab_size": 16, "itos": dict(enumerate(chars)), "stoi": {c: i for i, c in enumerate(chars)}}
    (folder / "meta.json").write_text(json.dumps(meta))
    return str(folder)


def tiny_flags(dataset, out_dir, **overrides):
    """train.py flags for a 2-layer model that trains in about a second."""
    flags = dict(dataset=dataset, out_dir=out_dir, n_layer=2, n_head=2, n_embd=32, block_size=16,
                 batch_size=4, max_iters=12, lr_decay_iters=12, warmup_iters=2, eval_interval=6,
                 eval_iters=2, log_interval=1, device="cpu", dropout=0.1)
    flags.update(overrides)
    return [f"--{k}={v}" for k, v in flags.items() if v is not None]
