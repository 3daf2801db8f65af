"""What bench.py measures, one module each: training (a full step), decode (generation),
checkpoints (trained models on their val set), kernel_compare (Triton vs PyTorch), profiling
(where the CPU time goes); timing holds the clock and the rounds they share."""
