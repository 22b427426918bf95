-- CIFAR-10, L_hybrid: the improved-diffusion README run (MODEL/DIFFUSION/TRAIN_FLAGS)
-- and mmgeneration's ddpm_cosine_hybird_timestep-4k_drop0.3_cifar10_32x32_b8x16_500k.
-- num_heads, attention_resolutions, use_scale_shift_norm and ema_rate are the official
-- defaults, written out. Data: the CIFAR-10 binary version (cifar-10-batches-bin).
--   iddpm run recipes/cifar10_hybrid.lua data_dir=data/cifar-10-batches-bin
-- The official run is b8x16: 8 GPUs x 16 images, a global batch of 128 (batch_size is
-- per rank). On one device batch_size = 128 below is that global batch; on 8 GPUs:
--   iddpm run recipes/cifar10_hybrid.lua device=cuda gpus=8 batch_size=16
return require("iddpm.recipe").run({
  dataset = "cifar10", data_dir = "data/cifar-10-batches-bin", run_dir = "runs/cifar10_hybrid",
  image_size = 32, num_channels = 128, num_res_blocks = 3, channel_mult = "1,2,2,2",
  attention_resolutions = "16,8", num_heads = 4, use_scale_shift_norm = true,
  dropout = 0.3, learn_sigma = true,
  diffusion_steps = 4000, noise_schedule = "cosine",
  lr = 1e-4, batch_size = 128, ema_rate = "0.9999", weight_decay = 0.0,
  max_steps = 500000, log_interval = 100, save_interval = 10000, keep_checkpoints = 20,
  sample_interval = 10000, sample_steps = "100", num_samples = 64, seed = 0,
}, arg)
