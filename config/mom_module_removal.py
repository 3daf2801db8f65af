"""MoM, the paper's module-removal ablation: half of the attention modules and three quarters of
the FFN modules are kept (taken from evenly spaced dense layers), H = L. For the 4-layer stage-1
model in out/: 2 attention modules, 3 FFN modules, H = 4."""
variant = "mom"
init_from = "out"
out_dir = "out-mom-module-removal"
n_attn_modules = 2
n_ffn_modules = 3
