"""Router-tuning with the official code's recipe: `python train.py config/router_tuning_official.py --init_from=out-base6`.
1000 sequences, 64 per step, one pass (16 steps), AdamW at 1e-5 with 3% warmup (1 step) and a cosine
to 0, no weight decay, attention gates per sequence, and the official sparsity term (gradient_scale x
sum over gated layers of the mean gate, no target). The official script ships gradient_scale 0.0
(no sparsity term at all): the gates then stay where the LM loss leaves them, mostly open; raise
--sparsity_coef to close more. Unlike the official code we tune on pretraining text, not on
instruction data with the prompt masked out."""
variant = "router_tuning"
out_dir = "out-router_tuning-official"
skip = "attn"
router_level = "sequence"
sparsity = "official"
sparsity_coef = 0.0
train_samples = 1000  # one epoch: 16 steps x 64 windows, each window once (no replacement)
batch_size = 64
max_iters = 16
lr_decay_iters = 16
learning_rate = 1e-5
min_lr = 0.0
warmup_iters = 1
weight_decay = 0.0
eval_interval = 16
