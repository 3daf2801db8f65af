"""
The variants: each technique is a subclass of model.GPT, registered here under the name that
`--variant` (train.py) and `--variants` (bench.py) take.

    register("mod", MoDGPT, MoDConfig)    # name -> (model class, its settings dataclass)

train.py, sample.py, bench.py and experiments/ talk to a model only through the members of
CONTRACT below and never branch on a variant's name, so a fourth technique is one subclass of
GPT and one register() call. GPT holds GPT-2's behaviour for every member; a variant
overrides what it changes. Settings are a dataclass whose fields become flags of the same name.
"""

import dataclasses

from mindskip import MindSkipConfig, MindSkipGPT
from mod import MoDConfig, MoDGPT
from model import GPT
from mom import MoMConfig, MoMGPT

CONTRACT = {  # member: what it returns or means (the default on GPT: GPT-2's behaviour)
    "__init__": "(config, settings=None); settings: the variant's dataclass of flags",
    "from_dense": "classmethod (dense, settings): the variant built from a trained GPT-2",
    "make_blocks": "(config): transformer.h, the blocks __init__ builds (MoM: none)",
    "starts_from_dense": "True if it cannot train from scratch (train.py needs --init_from)",
    "train_defaults": "classmethod (cfg): {training flag: default} it changes; flags win",
    "forward_trunk": "(x, cache): (hidden state, {aux loss name: unweighted value})",
    "loss_weights": "{aux loss name: coefficient}; every aux loss needs one",
    "training_loss": "(lm_loss, aux): the loss a step minimises, LM + weighted aux losses",
    "configure_optimizers": "(weight_decay, lr, betas, device_type): the optimizer",
    "evaluate": "(idx, targets): metrics of one val batch; 'loss' is the tracked val loss",
    "flops_per_token": "(seq_len): training FLOPs per token (DESIGN.md convention)",
    "step_flops_per_token": "(seq_len): the same for the routing its last forward took",
    "generate": "(idx, max_new_tokens, temperature, top_k, use_cache, cache): tokens",
    "generation_forward": "(idx, cache, seen, use_cache): one step of generate's window",
    "new_cache": "(): an empty KV cache for generate",
    "kv_cache_nbytes": "(cache): bytes of keys and values it holds",
    "depth_per_token": "(idx, prompt_len): share of the network each token went through",
    "checkpoint_state_dict": "(): the tensors a checkpoint keeps",
    "ddp_find_unused_parameters": "True if a weight may get no gradient in a step",
    "decode_settings": "classmethod (settings): {row label: settings} bench --decode times",
    "calibrate_untrained": "(seed): an untrained model made to act as its settings say",
    "kernel_block": "(): (module, run(x)) whose kernels --kernels switches, or None",
}

VARIANTS = {}  # name -> (model class, settings dataclass or None)


def register(name, cls, settings_cls=None):
    """Add a variant; refuses a class that lacks a member of CONTRACT, naming it."""
    missing = [member for member in CONTRACT if not hasattr(cls, member)]
    if missing:
        raise TypeError(f"variant {name!r}: {cls.__name__} lacks the contract member "
                        f"{missing[0]!r} (see variants.CONTRACT; subclass model.GPT for defaults)")
    if settings_cls is not None and not dataclasses.is_dataclass(settings_cls):
        raise TypeError(f"variant {name!r}: its settings {settings_cls!r} must be a dataclass")
    if name in VARIANTS and VARIANTS[name] != (cls, settings_cls):
        raise ValueError(f"variant {name!r} is registered already")
    VARIANTS[name] = (cls, settings_cls)


def settings_fields(name):
    """{flag name: dataclasses.Field} of a variant's own settings."""
    settings_cls = VARIANTS[name][1]
    return {f.name: f for f in dataclasses.fields(settings_cls)} if settings_cls else {}


def owners(flag):
    """The variants that have `flag` among their settings."""
    return [name for name in VARIANTS if flag in settings_fields(name)]


def default_out_dir(name):
    """out for the dense model, out-<name> for a technique."""
    return "out" if VARIANTS[name][0] is GPT else f"out-{name}"


register("baseline", GPT)  # the first one registered is the reference of bench.py's ratios
register("mod", MoDGPT, MoDConfig)
register("mom", MoMGPT, MoMConfig)
register("router_tuning", MindSkipGPT, MindSkipConfig)
