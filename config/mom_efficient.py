"""MoM, the paper's efficient setting: fewer assembly steps than layers, more modules per step
(H < L, K > 1). For the 4-layer stage-1 model in out/: H = 2, K = 2."""
variant = "mom"
init_from = "out"
out_dir = "out-mom-efficient"
assembly_steps = 2
modules_per_step = 2
