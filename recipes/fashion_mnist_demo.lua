-- Fashion-MNIST demo: a small L_hybrid model that trains on 2 CPU cores and samples
-- recognisable clothes with a respaced 50-step sampler (learned variances make few
-- steps work, the paper's point). Data: Debian's dataset-fashion-mnist
-- (/usr/share/datasets/fashion-mnist) at its native 28x28 (a 3-level UNet fits 28 ->
-- 14 -> 7; image_size=32 pads to 32x32 instead, ~30% more work per image).
-- Training stops at max_steps or after max_minutes, whichever comes first, so that
-- training + sampling stay within 30 minutes on a slow or busy machine.
--   iddpm run recipes/fashion_mnist_demo.lua          (or: make demo)
--   iddpm run recipes/fashion_mnist_demo.lua device=cuda
-- On a GPU this model is too small for bf16 to pay: its kernels are short and the step
-- is bound by launches (H100, 4000 steps: fp32 35 s, bf16 46 s, both final loss 0.080),
-- so the recipe asks for fp32 (the CPU always computes in fp32).
return require("iddpm.recipe").run({
  dataset = "fashion_mnist", data_dir = "/usr/share/datasets/fashion-mnist", run_dir = "runs/fashion_demo",
  image_size = 28, num_channels = 32, num_res_blocks = 1, channel_mult = "1,2,2",
  attention_resolutions = "", num_heads = 4, use_scale_shift_norm = true,
  dropout = 0.0, learn_sigma = true,
  diffusion_steps = 1000, noise_schedule = "cosine",
  lr = 1e-3, batch_size = 16, ema_rate = "0.99", weight_decay = 0.0, warmup_steps = 50,
  max_steps = 4000, max_minutes = 24, log_interval = 50, save_interval = 250, keep_checkpoints = 3,
  sample_interval = 0, sample_steps = "50", num_samples = 36, seed = 0, precision = "fp32",
}, arg)
