-- ImageNet 64x64 unconditional, L_hybrid with dropout 0.3: mmgeneration's
-- ddpm_cosine_hybird_timestep-4k_drop0.3_imagenet1k_64x64_b8x16_1500k (a variant the
-- official code never ran). Otherwise identical to imagenet64_hybrid.lua.
--   iddpm run recipes/imagenet64_hybrid_drop0.3.lua data_dir=data/imagenet64
-- The official run is b8x16: 8 GPUs x 16 images, a global batch of 128 (batch_size is
-- per rank). On one device batch_size = 128 below is that global batch; on 8 GPUs:
--   iddpm run recipes/imagenet64_hybrid_drop0.3.lua device=cuda gpus=8 batch_size=16
return require("iddpm.recipe").run({
  dataset = "auto", data_dir = "data/imagenet64", run_dir = "runs/imagenet64_hybrid_drop0.3",
  image_size = 64, num_channels = 128, num_res_blocks = 3, channel_mult = "1,2,3,4",
  attention_resolutions = "16,8", num_heads = 4, use_scale_shift_norm = true,
  dropout = 0.3, learn_sigma = true,
  diffusion_steps = 4000, noise_schedule = "cosine",
  lr = 1e-4, batch_size = 128, ema_rate = "0.9999", weight_decay = 0.0,
  max_steps = 1500000, log_interval = 100, save_interval = 10000, keep_checkpoints = 20,
  sample_interval = 10000, sample_steps = "100", num_samples = 64, seed = 0,
}, arg)
