"""Router-tuning on the released GPT-2 124M, the paper's setting one command away (needs internet):

    python data/openwebtext/prepare.py --subsets 1      # one of 21 subsets, about 630 MB
    python train.py config/router_tuning_gpt2.py

Attention gates on layers 5-10 (the upper half minus the last), one decision per sequence,
target capacity 0.5; only the 6 routers (768 weights each) train, by one epoch over 1,000
windows of 1,024 tokens (16 steps of 64), the backbone frozen. Cost, on paper (not run by
this project, which has no GPU): about 4 x 124M FLOPs per token (a frozen weight needs no
weight gradient) x 1.0M tokens = 5e14 FLOPs, seconds on one A100; the evaluations (2 x 100
batches of 8 x 1,024 tokens) cost about as much again. Compare with `--eval_only=True
--init_from=gpt2` (GPT-2's own val loss, about 3.12 on OpenWebText)."""
variant = "router_tuning"
init_from = "gpt2"
out_dir = "out-router_tuning-gpt2"
dataset = "openwebtext"
skip = "attn"
router_level = "sequence"
target_capacity = 0.5
train_samples = 1000
batch_size = 8
gradient_accumulation_steps = 8
block_size = 1024
max_iters = 16
lr_decay_iters = 16
warmup_iters = 1
learning_rate = 2e-3
min_lr = 2e-4
weight_decay = 0.0
eval_interval = 16
eval_iters = 100
log_interval = 1
