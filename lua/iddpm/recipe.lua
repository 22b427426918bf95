-- iddpm/recipe.lua — recipes as plain Lua tables.
--
-- A recipe file is data plus one line that hands it to the driver:
--     return require("iddpm.recipe").run({ image_size = 32, ... }, arg)
-- The driver merges defaults <- recipe <- command-line key=value overrides through the
-- schema below (iddpm.config: each key's type, range, meaning and default; unknown keys
-- name the nearest one; cross-key checks such as sample_steps against diffusion_steps,
-- the image size against the UNet's downsamplings and a writable run_dir), prints the
-- keys that differ from the defaults and trains (iddpm.train). Key names are the official
-- ones (improved-diffusion's model_and_diffusion_defaults() and train flags); the rest are ours.
--
--   recipe.KEYS                  ordered list of {name, type, default, help, constraints}
--   recipe.SCHEMA                the iddpm.config schema of KEYS
--   recipe.defaults()            -> fresh table of defaults
--   recipe.parse_args(arg)       -> {key = string} from "key=value" strings
--   recipe.resolve(cfg, args)    -> resolved config (errors on unknown keys / bad values)
--   recipe.describe(config)      -> multi-line text of the resolved config
--   recipe.load(path)            -> the recipe table in a file, without training
--   recipe.run(cfg, arg)         -> resolve, print, train; returns the train result
local cfg = require "iddpm.config"

local R = {}

-- {name, type, default, help, constraints...}: the schema of iddpm.config (types int,
-- num, bool, str, ints / nums = comma-separated lists kept as strings, as in the official flags)
local CH = {"linear", "cosine"}
R.KEYS = {
  -- model (model_and_diffusion_defaults)
  {"image_size", "int", 64, "image side in pixels", min = 1, group = "model"},
  {"in_channels", "int", 0, "image channels; 0 = from the data", min = 0},
  {"num_channels", "int", 128, "base channel count of the UNet (x every mult: a multiple of 32)", min = 1},
  {"num_res_blocks", "int", 2, "residual blocks per resolution", min = 1},
  {"channel_mult", "ints", "", "channel multipliers, e.g. \"1,2,2,2\"; empty = the official default for image_size", min = 1},
  {"num_heads", "int", 4, "attention heads", min = 1},
  {"num_heads_upsample", "int", -1, "attention heads in the decoder (-1 = num_heads)", min = 1, also = {-1}},
  {"attention_resolutions", "ints", "16,8", "resolutions with self-attention", min = 1},
  {"dropout", "num", 0.0, "dropout in the residual blocks", min = 0, max = 0.99},
  {"learn_sigma", "bool", false, "learn the variance (output 2C channels, L_hybrid)"},
  {"sigma_small", "bool", false, "fixed small variance (when not learned)"},
  {"class_cond", "bool", false, "class-conditional model (labels from the data)"},
  {"use_scale_shift_norm", "bool", true, "FiLM-style timestep conditioning"},
  {"use_checkpoint", "bool", false, "accepted for compatibility; ignored"},
  {"use_fp16", "bool", false, "accepted for compatibility; must be false"},
  -- diffusion
  {"diffusion_steps", "int", 1000, "T", min = 1, max = 100000, group = "diffusion"},
  {"noise_schedule", "schedule", "linear", "linear, cosine, or (in a recipe) a function alpha_bar(t), t in [0,1], "
    .. "or a table of betas", one_of = CH},
  {"timestep_respacing", "str", "", "respacing for training (normally empty)"},
  {"use_kl", "bool", false, "train on L_vlb (rescaled KL)"},
  {"predict_xstart", "bool", false, "model predicts x_0 instead of eps"},
  {"rescale_timesteps", "bool", true, "feed t*1000/T to the model"},
  {"rescale_learned_sigmas", "bool", true, "RESCALED_MSE: vb term x T/1000"},
  -- training (official flags)
  {"data_dir", "str", "", "dataset location", group = "data and training"},
  {"schedule_sampler", "str", "uniform", "uniform or loss-second-moment", one_of = {"uniform", "loss-second-moment"}},
  {"lr", "num", 1e-4, "AdamW learning rate", gt = 0},
  {"weight_decay", "num", 0.0, "AdamW weight decay", min = 0},
  {"lr_anneal_steps", "int", 0, "linear decay of lr to 0 over this many steps (0 = none); training stops there", min = 0},
  {"batch_size", "int", 1, "images per step", min = 1},
  {"microbatch", "int", -1, "split each batch into chunks of this size (-1 = off)", min = 1, also = {-1, 0}},
  {"ema_rate", "nums", "0.9999", "EMA rate(s), comma-separated", min = 0, max = 1},
  {"log_interval", "int", 10, "steps between log lines", min = 1},
  {"save_interval", "int", 10000, "steps between checkpoints", min = 1},
  {"resume_checkpoint", "str", "", "a checkpoint file to start from (overrides resume)"},
  -- ours
  {"dataset", "str", "auto", "auto, cifar10, fashion_mnist, mnist, idx, folder, imagenet64, random",
    one_of = {"auto", "cifar10", "fashion_mnist", "mnist", "idx", "folder", "imagenet64", "random"}},
  {"random_flip", "bool", false, "random horizontal flips (the official code has none)"},
  {"pad", "bool", true, "zero-pad smaller images (28 -> 32) up to image_size"},
  {"num_images", "int", 64, "size of the fake dataset when dataset=random", min = 1},
  {"run_dir", "str", "runs/default", "where checkpoints, logs and samples go", nonempty = true, group = "run"},
  {"seed", "int", 0, "seed of every generator (init, data order, timesteps, noise, dropout)", min = 0},
  {"max_steps", "int", 0, "stop after this many optimizer steps (0 = never, or at lr_anneal_steps)", min = 0},
  {"max_minutes", "num", 0.0, "also stop after this many minutes of training in this process (0 = no limit)", min = 0},
  {"keep_checkpoints", "int", 5, "keep the newest K checkpoints (0 = all)", min = 0},
  {"resume", "str", "auto", "auto: continue from the newest checkpoint in run_dir; none: start fresh"},
  {"grad_clip", "num", 0.0, "clip the global gradient norm to this (0 = off, as official)", min = 0},
  {"warmup_steps", "int", 0, "linear lr warm-up over this many steps", min = 0},
  {"microbatch_sum", "bool", false, "official quirk: sum microbatch gradients instead of averaging"},
  {"sample_interval", "int", 0, "steps between sample grids (0 = only at the end)", min = 0},
  {"sample_steps", "str", "100", "respacing used for the sample grids (e.g. 50, ddim50)", nonempty = true},
  {"num_samples", "int", 16, "images in each sample grid (0 = no grids)", min = 0, max = 4096},
  {"grid_scale", "int", 0, "sample grids: upscale each image this many times (nearest); 0 = so that a grid is "
    .. ">= 512 px wide", min = 0, max = 64},
  {"num_threads", "int", 0, "engine threads (0 = all cores)", min = 0, max = 4096, group = "machine"},
  {"gpus", "int", 0, "data parallelism on one machine: start this many ranks, one GPU each (batch_size is per rank)",
    min = 0, max = 256},
  {"nproc", "int", 0, "the same as gpus (ranks on one machine); on the CPU use mpirun -np N instead", min = 0, max = 256},
  {"dist_timeout", "num", 600.0, "seconds a rank waits for the others in a collective before stopping the run", gt = 0},
  {"device", "str", "cpu", "cpu or cuda (model, EMA, optimizer state, batches and noise on that device)",
    one_of = {"cpu", "cuda"}},
  {"precision", "str", "auto", "GPU precision: auto (= bf16 on cuda: bf16 channels-last activations, bf16 products, fp32 weights and optimizer), fp32, tf32 or bf16; the CPU uses fp32",
    one_of = {"auto", "fp32", "tf32", "bf16"}},
}

R.TYPE, R.DEFAULT, R.HELP = {}, {}, {}
for _, k in ipairs(R.KEYS) do R.TYPE[k[1]], R.DEFAULT[k[1]], R.HELP[k[1]] = k[2], k[3], k[4] end

-- a respacing ("100", "10,15,20", "ddim50") must fit T; -> nil or the reason
local function respacing_error(steps, resp)
  if resp == "" or resp == tostring(steps) then return nil end
  local ok, err = pcall(require("iddpm.diffusion").space_timesteps, steps, resp)
  if ok then return nil end
  return (tostring(err):gsub("^D%.space_timesteps: ", ""))
end

-- cross-key checks, after every key has its type and range
local function check(c, given)
  local E = cfg.error
  if type(c.noise_schedule) == "table" then   -- T is the table's length
    local n = #c.noise_schedule
    if given.diffusion_steps and c.diffusion_steps ~= n then
      E(("diffusion_steps = %d but the noise_schedule table has %d betas"):format(c.diffusion_steps, n))
    end
    c.diffusion_steps = n
  end
  if c.noise_schedule == "linear" and c.diffusion_steps <= 20 then   -- beta_T = 0.02 * 1000 / T must stay below 1
    E(("noise_schedule=linear needs diffusion_steps > 20 (its last beta is 0.02 * 1000 / T = %g, which must be below 1; "
      .. "at 1 the last step destroys the image and the loss is not finite); use more steps or noise_schedule=cosine")
      :format(0.02 * 1000 / c.diffusion_steps))
  end
  if c.use_fp16 then E("use_fp16=true is not supported (the engine trains in float32; on a GPU use precision=bf16)") end
  local r = respacing_error(c.diffusion_steps, c.timestep_respacing)
  if r then E(("timestep_respacing=%s does not fit diffusion_steps=%d: %s"):format(c.timestep_respacing, c.diffusion_steps, r)) end
  r = c.num_samples > 0 and respacing_error(c.diffusion_steps, c.sample_steps)
  if r then
    E(("sample_steps=%s does not fit diffusion_steps=%d: %s; use a number of steps <= %d, a list like 10,15,20, "
      .. "or ddimN where some integer stride gives N steps"):format(c.sample_steps, c.diffusion_steps, r, c.diffusion_steps))
  end
  if c.microbatch > c.batch_size then
    E(("microbatch=%d is larger than batch_size=%d"):format(c.microbatch, c.batch_size))
  end
  require("iddpm.nn.unet").check_config{image_size = c.image_size, num_channels = c.num_channels,
    channel_mult = c.channel_mult ~= "" and c.channel_mult or nil, attention_resolutions = c.attention_resolutions,
    num_heads = c.num_heads, num_heads_upsample = c.num_heads_upsample}
  if c.resume_checkpoint ~= "" and cfg.mode(c.resume_checkpoint) == nil then
    E(("resume_checkpoint=%s does not exist"):format(c.resume_checkpoint))
  end
  if c.resume ~= "auto" and c.resume ~= "none" and c.resume ~= "" and c.resume ~= "false" and cfg.mode(c.resume) == nil then
    E(("resume=%s: expected auto, none, or an existing checkpoint file or run directory"):format(c.resume))
  end
  cfg.check_writable(c.run_dir, "run_dir")
end

R.SCHEMA = cfg.schema("train", R.KEYS, {check = check, usage = "iddpm train [RECIPE.lua] [key=value ...] [help] [--dry-run]\n"
  .. "       iddpm run RECIPE.lua [key=value ...] [help] [--dry-run]"})

function R.defaults() return cfg.defaults(R.SCHEMA) end

-- convert v (a string from the command line, or a recipe value) to key's type
function R.convert(key, v)
  return cfg.convert(R.SCHEMA, cfg.canonical(R.SCHEMA, key), v)
end

-- {"key=value", ...} (the script's arg) -> {key = "value"}, and the keys in order
function R.parse_args(args)
  local p = cfg.parse_args(args)
  if #p.positional > 0 then
    cfg.error(("bad argument '%s': overrides are key=value (e.g. batch_size=64)"):format(p.positional[1]))
  end
  local out, order = {}, {}
  for _, kv in ipairs(p.pairs) do out[kv[1]] = kv[2]; order[#order + 1] = kv[1] end
  return out, order
end

-- defaults <- cfg (the recipe table) <- args (the script's arg, or a {key = value} map)
function R.resolve(recipe_cfg, args)
  return (cfg.resolve(R.SCHEMA, recipe_cfg, args))
end

-- the resolved config, one key a line; changed_only: the keys that differ from the defaults
function R.describe(c, changed_only)
  local lines = {}
  for _, k in ipairs(R.KEYS) do
    local v = c[k[1]]
    if not changed_only or v ~= k[3] then
      local s = type(v) == "string" and ("%q"):format(v) or cfg.show(v)
      lines[#lines + 1] = ("  %-24s %s%s"):format(k[1], s, (v ~= k[3] and not changed_only) and "   *" or "")
    end
  end
  return table.concat(lines, "\n")
end

-- load a recipe file and return its table without training
function R.load(path)
  local chunk, err = loadfile(path)
  if not chunk then
    if cfg.mode(path) == nil then cfg.error(("recipe %s does not exist"):format(path)) end
    error(err, 0)
  end
  R._loading = true
  local ok, res = pcall(chunk)
  R._loading = false
  if not ok then error(res, 0) end
  return res
end

function R.run(cfg, args)
  if R._loading then return cfg end
  return require("iddpm.train").main(cfg, args)
end

return R
