"""
What gpu_suite.py measures, one job per process: `python gpu_jobs.py JOB ARGS.json OUT.json`.

    train         one training step of one variant (forward, backward, AdamW), eager or compiled:
                  median seconds, tokens/s, FLOPs per token, MFU, peak memory
    decode        cached greedy decoding, tokens/s at each batch, every variant and transformers'
                  GPT2LMHeadModel.generate at the same dims (random weights, no download)
    graph_breaks  torch._dynamo.explain of each variant's training forward: graphs and breaks

Random tokens throughout: speed and size depend on the shapes, not on the text. The settings
measured: MoD at C = 0.125 in every other block (the paper's best), MoM at H = L/2 assembly
steps over pools of every layer, router-tuning on the paper's layers (the upper half minus the
last) with half of them open (target 0.5; when decoding, every other gated layer closed).
"""

import json
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from configurator import import_optional
from model import GPT, GPTConfig
from variants import VARIANTS


def settings_for(name, n_layer, kernels="torch"):
    """The settings each variant is measured with (module docstring); defaults for the others."""
    settings_cls = VARIANTS[name][1]
    extra = {
        "mod": dict(capacity=0.125, route_every=2, kernels=kernels),
        "mom": dict(assembly_steps=max(1, n_layer // 2)),
        "router_tuning": dict(target_capacity=0.5),
    }.get(name, {})
    return settings_cls(**extra) if settings_cls else None


def build(name, dims, kernels="torch", seed=0):
    """A freshly initialised variant (from a random dense GPT where it tunes a trained one)."""
    torch.manual_seed(seed)
    cls = VARIANTS[name][0]
    settings = settings_for(name, dims["n_layer"], kernels)
    config = GPTConfig(**dims)
    return cls.from_dense(GPT(config), settings) if cls.starts_from_dense else cls(config, settings)


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def autocast_for(args):
    device_type = args["device"].split(":")[0]
    return (
        torch.autocast(device_type, dtype=torch.bfloat16)
        if args["dtype"] == "bfloat16"
        else nullcontext()
    )


def random_batch(dims, batch_size, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (batch_size, dims["block_size"])
    return (
        torch.randint(dims["vocab_size"], shape, generator=g).to(device),
        torch.randint(dims["vocab_size"], shape, generator=g).to(device),
    )


def realised_flops_per_token(model, seq_len):
    """Training FLOPs per token of the step just run: MoM's untrained routers send some choices
    to SKIP, so the routing its last step took counts; every other variant runs its settings."""
    if getattr(model, "last_routing", None) is not None and hasattr(
        model, "routing_flops_per_token"
    ):
        return model.routing_flops_per_token(model.last_routing)
    return model.flops_per_token(seq_len)


def graphs_compiled():
    """Graphs torch.compile has produced so far in this process (recompilations included)."""
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def train(args, save):
    """One row per (variant, kernels) of args['cases'], saved as each is measured."""
    rows = []
    for name, kernels in args["cases"]:
        rows.append(
            {
                "variant": name,
                "kernels": kernels,
                "mode": "compiled" if args["compile"] else "eager",
                "batch": args["batch_size"],
                "seq_len": args["dims"]["block_size"],
                **train_row(args, name, kernels),
            }
        )
        save({"rows": rows})
        torch._dynamo.reset()


def timed(run, device):
    """Seconds one call of run() takes, the GPU's queue drained before and after."""
    sync(device)
    t0 = time.perf_counter()
    run()
    sync(device)
    return time.perf_counter() - t0


def train_row(args, name, kernels):
    """A variant's full training step, timed after warmup (compile included there)."""
    device, dims = args["device"], args["dims"]
    model = build(name, dims, kernels).to(device)
    # the project's AdamW (fused on CUDA; router-tuning: its routers only)
    optimizer = model.configure_optimizers(0.1, 6e-4, (0.9, 0.95), device.split(":")[0])
    step_model = torch.compile(model, backend=args["backend"]) if args["compile"] else model
    x, y = random_batch(dims, args["batch_size"], device)

    def step():
        with autocast_for(args):
            _, loss, aux = step_model(x, y)
            loss = loss + sum(model.loss_weights[k] * v for k, v in aux.items())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    first_step_s = timed(step, device)  # compiles, when compiled
    for _ in range(1 if args["warm_only"] else args["warmup"]):
        step()
    if args["warm_only"]:
        return {"first_step_s": first_step_s}
    graphs_before = graphs_compiled()
    times = [timed(step, device) for _ in range(args["steps"])]
    seconds, tokens = statistics.median(times), args["batch_size"] * dims["block_size"]
    flops = realised_flops_per_token(model, dims["block_size"])
    memory = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    return {"step_ms": 1e3 * seconds, "spread": (max(times) - min(times)) / seconds,
            "tok_s": tokens / seconds, "flops_per_token": flops,
            "mfu": flops * tokens / seconds / (args["peak_tflops"] * 1e12), "peak_mem_gib": memory,
            "first_step_s": first_step_s, "recompiles_timed": graphs_compiled() - graphs_before}


def graph_breaks(args, save):
    """Per variant (and MoD with its kernels): graphs and graph breaks of one training forward
    under torch._dynamo.explain, and where each kind of break happens."""
    device, dims, rows = args["device"], args["dims"], []
    for name, kernels in args["cases"]:
        model = build(name, dims, kernels).to(device)
        x, y = random_batch(dims, args["batch_size"], device)

        def loss_of(x, y, model=model):
            with autocast_for(args):
                _, loss, aux = model(x, y)
                return loss + sum(model.loss_weights[k] * v for k, v in aux.items())

        torch._dynamo.reset()
        explained = torch._dynamo.explain(loss_of)(x, y)
        where = {}
        for reason in explained.break_reasons:
            frame = reason.user_stack[-1] if reason.user_stack else None
            at = f"{Path(frame.filename).name}:{frame.lineno}" if frame else "?"
            key = f"{reason.reason.splitlines()[0][:80]} @ {at}"
            where[key] = where.get(key, 0) + 1
        rows.append(
            {
                "variant": name,
                "kernels": kernels,
                "graphs": explained.graph_count,
                "graph_breaks": explained.graph_break_count,
                "reasons": "; ".join(
                    f"{n}x {k}" for k, n in sorted(where.items(), key=lambda kv: -kv[1])
                ),
            }
        )
        del model
        save({"rows": rows})


def import_transformers():
    """transformers' (GPT2Config, GPT2LMHeadModel), imported beside this repository's kernels.py
    (which would shadow the PyPI package `kernels` that recent transformers import)."""
    classes, why_not = import_optional("transformers", "GPT2Config", "GPT2LMHeadModel")
    if classes is None:
        raise ImportError(why_not)
    return classes


def transformers_generate(dims, device):
    """GPT2LMHeadModel.generate at the same dims, random weights, greedy, never stopping early."""
    GPT2Config, GPT2LMHeadModel = import_transformers()
    config = GPT2Config(
        vocab_size=dims["vocab_size"],
        n_positions=dims["block_size"],
        n_embd=dims["n_embd"],
        n_layer=dims["n_layer"],
        n_head=dims["n_head"],
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=None,
        eos_token_id=None,
    )
    hf = GPT2LMHeadModel(config).to(device).eval()

    def generate(prompt, n):
        return hf.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            use_cache=True,
            pad_token_id=0,
        )

    return generate


def our_generate(name, dims, device):
    """generate() of a variant, set up to route as it is measured (module docstring)."""
    model = build(name, dims).to(device).eval().calibrate_untrained(seed=1)  # MoD: C routed

    def generate(prompt, n):
        cache = None
        if name == "router_tuning":  # every other gated layer closed: half of the paper's layers
            cache = model.new_cache(
                {
                    layer: torch.full((prompt.size(0),), i % 2 == 0, device=device)
                    for i, layer in enumerate(model.gated)
                }
            )
        return model.generate(prompt, n, temperature=0, use_cache=True, cache=cache)

    return generate


def decode_rows(name, generate, args):
    """One row per batch size: the best of args['repeats'] timed generations after a warmup."""
    rows, n = [], args["new_tokens"]
    for batch_size in args["batches"]:
        prompt = torch.zeros((batch_size, 1), dtype=torch.long, device=args["device"])
        with autocast_for(args):
            generate(prompt, 4)  # warmup
            best = min(timed(lambda: generate(prompt, n), args["device"])
                       for _ in range(args["repeats"]))
            made = generate(prompt, n).size(1) - 1  # transformers' generate must not stop early
        rows.append({"model": name, "batch": batch_size, "new_tokens": made,
                     "tok_s": batch_size * n / best, "ms_per_token": 1e3 * best / n})
    return rows


@torch.no_grad()
def decode(args, save):
    """Cached greedy decoding tokens/s per model and batch size; a model that fails (transformers
    missing or incompatible, say) gets a row saying why, and the others are still measured."""
    device, dims, rows = args["device"], args["dims"], []
    makers = {name: (lambda name=name: our_generate(name, dims, device))
              for name in args["variants"]}
    makers["transformers GPT-2"] = lambda: transformers_generate(dims, device)
    for name, make in makers.items():
        try:
            rows += decode_rows(name, make(), args)
        except Exception as e:
            reason = f"{e.__class__.__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            rows.append({"model": name, "error": reason})
        save({"rows": rows})


JOBS = {"train": train, "graph_breaks": graph_breaks, "decode": decode}

if __name__ == "__main__":
    job, args_path, out_path = sys.argv[1:4]
    args = json.loads(Path(args_path).read_text())
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as train.py
    JOBS[job](
        args, lambda result: Path(out_path).write_text(json.dumps(result, indent=1))
    )  # after every row
