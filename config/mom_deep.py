"""MoM, the paper's deep setting: more assembly steps than the dense model has layers (H > L),
at the dense model's parameters. For the 4-layer stage-1 model in out/: H = 6, K = 1."""
variant = "mom"
init_from = "out"
out_dir = "out-mom-deep"
assembly_steps = 6
modules_per_step = 1
