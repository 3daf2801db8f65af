"""--profile: where each model's CPU time goes, by kind of op (torch.profiler self time)."""

import torch

OP_KINDS = {  # torch.profiler op names -> what the time was spent on (the first match counts)
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm"),
    "attention": ("scaled_dot_product", "attention"),
    "moving rows": ("index", "cat", "copy_", "fill_", "zero", "scatter", "gather", "sort", "topk",
                    "stack", "where", "clone", "bincount", "nonzero", "_local_scalar_dense"),
}


def op_kind(event):
    """"optimizer" for anything run inside an optimizer step (on a CPU AdamW loops over the
    parameters with ordinary ops), else the OP_KINDS entry of its name, else "other"."""
    parent = event
    while parent is not None:
        if parent.name.startswith("Optimizer."):
            return "optimizer"
        parent = parent.cpu_parent
    kinds = (kind for kind, names in OP_KINDS.items() if any(n in event.name for n in names))
    return next(kinds, "other")


def profile_shares(run):
    """Share of self CPU time per kind of op (optimizer, OP_KINDS, other) in one call of run(),
    the five ops that took the most, and how many ops it called (not counting ops called by
    ops)."""
    with torch.profiler.profile() as prof:
        run()
    events = prof.events()
    calls = sum(1 for e in events if e.name.startswith("aten::")
                and not (e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::")))
    total = sum(e.self_cpu_time_total for e in events) or 1
    shares = dict.fromkeys(["optimizer", *OP_KINDS, "other"], 0.0)
    for e in events:
        shares[op_kind(e)] += e.self_cpu_time_total / total
    top = sorted(prof.key_averages(), key=lambda op: -op.self_cpu_time_total)[:5]
    return shares, ", ".join(f"{op.key} {op.self_cpu_time_total / total:.0%}" for op in top), calls


def print_profiles(runs, per):
    """One line per model: where the CPU time of one call went, and its op calls per `per`
    (a (name, count) pair: the call holds `count` of them)."""
    print("# where the CPU time goes (torch.profiler, self time of one call): the AdamW step, "
          "matmuls, attention, moving rows (gathers, scatters, copies, sorts), other "
          "(elementwise ops, norms, views)")
    for name, run in runs.items():
        shares, top, calls = profile_shares(run)
        print(f"{name:<19} " + " ".join(f"{kind} {share:4.0%}" for kind, share in shares.items())
              + f"   {calls / per[1]:,.0f} ops per {per[0]}   top: {top}")
