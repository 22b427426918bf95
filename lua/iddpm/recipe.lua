-- iddpm/recipe.lua — recipes as plain Lua tables (docs/style.md §7.9).
--
-- A recipe file is data plus one line that hands it to the driver:
--     return require("iddpm.recipe").run({ image_size = 32, ... }, arg)
-- The driver merges defaults <- recipe <- command-line key=value overrides, converts
-- each override to the key's type, rejects unknown keys (listing the valid ones), prints
-- the resolved config and trains (iddpm.train). Key names are the official ones
-- (improved-diffusion's model_and_diffusion_defaults() and train flags); the rest are ours.
--
--   recipe.KEYS                  ordered list of {name, type, default, help}
--   recipe.defaults()            -> fresh table of defaults
--   recipe.parse_args(arg)       -> {key = string} from "key=value" strings
--   recipe.resolve(cfg, args)    -> resolved config (errors on unknown keys / bad values)
--   recipe.describe(config)      -> multi-line text of the resolved config
--   recipe.load(path)            -> the recipe table in a file, without training
--   recipe.run(cfg, arg)         -> resolve, print, train; returns the train result
local R = {}

-- type: int, num, bool, str ("16,8"-style lists are strings, as in the official flags)
R.KEYS = {
  -- model (model_and_diffusion_defaults)
  {"image_size", "int", 64, "image side in pixels"},
  {"in_channels", "int", 0, "image channels; 0 = from the data"},
  {"num_channels", "int", 128, "base channel count of the UNet"},
  {"num_res_blocks", "int", 2, "residual blocks per resolution"},
  {"channel_mult", "str", "", "channel multipliers, e.g. \"1,2,2,2\"; empty = the official default for image_size"},
  {"num_heads", "int", 4, "attention heads"},
  {"num_heads_upsample", "int", -1, "attention heads in the decoder (-1 = num_heads)"},
  {"attention_resolutions", "str", "16,8", "resolutions with self-attention"},
  {"dropout", "num", 0.0, "dropout in the residual blocks"},
  {"learn_sigma", "bool", false, "learn the variance (output 2C channels, L_hybrid)"},
  {"sigma_small", "bool", false, "fixed small variance (when not learned)"},
  {"class_cond", "bool", false, "class-conditional model (labels from the data)"},
  {"use_scale_shift_norm", "bool", true, "FiLM-style timestep conditioning"},
  {"use_checkpoint", "bool", false, "accepted for compatibility; ignored"},
  {"use_fp16", "bool", false, "accepted for compatibility; must be false"},
  -- diffusion
  {"diffusion_steps", "int", 1000, "T"},
  {"noise_schedule", "schedule", "linear", "linear, cosine, (in a recipe) a function alpha_bar(t), t in [0,1], or a table of betas"},
  {"timestep_respacing", "str", "", "respacing for training (normally empty)"},
  {"use_kl", "bool", false, "train on L_vlb (rescaled KL)"},
  {"predict_xstart", "bool", false, "model predicts x_0 instead of eps"},
  {"rescale_timesteps", "bool", true, "feed t*1000/T to the model"},
  {"rescale_learned_sigmas", "bool", true, "RESCALED_MSE: vb term x T/1000"},
  -- training (official flags)
  {"data_dir", "str", "", "dataset location"},
  {"schedule_sampler", "str", "uniform", "uniform or loss-second-moment"},
  {"lr", "num", 1e-4, "AdamW learning rate"},
  {"weight_decay", "num", 0.0, "AdamW weight decay"},
  {"lr_anneal_steps", "int", 0, "linear decay of lr to 0 over this many steps (0 = none); training stops there"},
  {"batch_size", "int", 1, "images per step"},
  {"microbatch", "int", -1, "split each batch into chunks of this size (-1 = off)"},
  {"ema_rate", "str", "0.9999", "EMA rate(s), comma-separated"},
  {"log_interval", "int", 10, "steps between log lines"},
  {"save_interval", "int", 10000, "steps between checkpoints"},
  {"resume_checkpoint", "str", "", "a checkpoint file to start from (overrides resume)"},
  -- ours
  {"dataset", "str", "auto", "auto, cifar10, fashion_mnist, mnist, idx, folder, imagenet64, random"},
  {"random_flip", "bool", false, "random horizontal flips (the official code has none)"},
  {"pad", "bool", true, "zero-pad smaller images (28 -> 32) up to image_size"},
  {"num_images", "int", 64, "size of the fake dataset when dataset=random"},
  {"run_dir", "str", "runs/default", "where checkpoints, logs and samples go"},
  {"seed", "int", 0, "seed of every generator (init, data order, timesteps, noise, dropout)"},
  {"max_steps", "int", 0, "stop after this many optimizer steps (0 = never, or at lr_anneal_steps)"},
  {"max_minutes", "num", 0.0, "also stop after this many minutes of training in this process (0 = no limit)"},
  {"keep_checkpoints", "int", 5, "keep the newest K checkpoints (0 = all)"},
  {"resume", "str", "auto", "auto: continue from the newest checkpoint in run_dir; none: start fresh"},
  {"grad_clip", "num", 0.0, "clip the global gradient norm to this (0 = off, as official)"},
  {"warmup_steps", "int", 0, "linear lr warm-up over this many steps"},
  {"microbatch_sum", "bool", false, "official quirk: sum microbatch gradients instead of averaging"},
  {"sample_interval", "int", 0, "steps between sample grids (0 = only at the end)"},
  {"sample_steps", "str", "100", "respacing used for the sample grids (e.g. 50, ddim50)"},
  {"num_samples", "int", 16, "images in each sample grid"},
  {"grid_scale", "int", 0, "sample grids: upscale each image this many times (nearest); 0 = so that a grid is >= 512 px wide"},
  {"num_threads", "int", 0, "engine threads (0 = all cores)"},
  {"device", "str", "cpu", "cpu or cuda (model, EMA, optimizer state, batches and noise on that device)"},
  {"precision", "str", "auto", "GPU precision: auto (= bf16 on cuda: bf16 channels-last activations, bf16 products, fp32 weights and optimizer), fp32, tf32 or bf16; the CPU uses fp32"},
}

R.TYPE, R.DEFAULT, R.HELP = {}, {}, {}
for _, k in ipairs(R.KEYS) do R.TYPE[k[1]], R.DEFAULT[k[1]], R.HELP[k[1]] = k[2], k[3], k[4] end

function R.defaults()
  local t = {}
  for k, v in pairs(R.DEFAULT) do t[k] = v end
  return t
end

local function valid_keys()
  local names = {}
  for _, k in ipairs(R.KEYS) do names[#names + 1] = k[1] end
  return table.concat(names, ", ")
end

-- nearest valid key by edit distance, for "did you mean"
local function suggest(key)
  local best, bd = nil, 4
  for _, k in ipairs(R.KEYS) do
    local a, b = key, k[1]
    local prev = {}
    for j = 0, #b do prev[j] = j end
    for i = 1, #a do
      local cur = {[0] = i}
      for j = 1, #b do
        cur[j] = math.min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a:sub(i, i) == b:sub(j, j) and 0 or 1))
      end
      prev = cur
    end
    if prev[#b] < bd then best, bd = b, prev[#b] end
  end
  return best
end

local function unknown(key, where)
  local s = suggest(key)
  error(("unknown config key '%s'%s%s.\nValid keys: %s"):format(key, where,
    s and (" (did you mean '" .. s .. "'?)") or "", valid_keys()), 0)
end

-- convert v (a string from the command line, or a recipe value) to key's type
function R.convert(key, v)
  local ty = R.TYPE[key]
  if ty == nil then unknown(key, "") end
  local function bad(what) error(("config key '%s': %s (expected %s)"):format(key, what, ty == "int" and "an integer"
    or ty == "num" and "a number" or ty == "bool" and "true or false" or "a string"), 0) end
  if ty == "schedule" then
    -- a name, or (from a recipe) a function alpha_bar(t) or a table of betas, kept as is;
    -- the checkpoint stores the resulting betas (train.lua)
    if type(v) == "function" then return v end
    if type(v) == "table" then
      if #v == 0 then error(("config key '%s': an empty table (expected a list of betas)"):format(key), 0) end
      for i = 1, #v do
        if type(v[i]) ~= "number" or not (v[i] > 0 and v[i] <= 1) then
          error(("config key '%s': betas[%d] = %s is not a number in (0, 1]"):format(key, i, tostring(v[i])), 0)
        end
      end
      return v
    end
    if type(v) ~= "string" then
      error(("config key '%s': a %s (expected linear, cosine, a function alpha_bar(t) or a table of betas)"):format(key, type(v)), 0)
    end
    return v
  end
  if ty == "bool" then
    if type(v) == "boolean" then return v end
    local s = tostring(v):lower()
    if s == "true" or s == "1" or s == "yes" then return true end
    if s == "false" or s == "0" or s == "no" then return false end
    bad(("%q is not a boolean"):format(tostring(v)))
  elseif ty == "int" then
    local n = tonumber(v)
    if n == nil then bad(("%q is not a number"):format(tostring(v))) end
    local i = math.tointeger(n)
    if i == nil then bad(("%s is not an integer"):format(tostring(v))) end
    return i
  elseif ty == "num" then
    local n = tonumber(v)
    if n == nil then bad(("%q is not a number"):format(tostring(v))) end
    return n + 0.0
  else
    if type(v) == "table" then
      local parts = {}
      for i, x in ipairs(v) do parts[i] = tostring(x) end
      return table.concat(parts, ",")
    end
    if type(v) == "boolean" or type(v) == "function" then bad(("a %s"):format(type(v))) end
    return tostring(v)
  end
end

-- {"key=value", ...} (the script's arg) -> {key = "value"}, in order as a list too
function R.parse_args(args)
  local out, order = {}, {}
  for i = 1, #(args or {}) do
    local a = args[i]
    local k, v = tostring(a):match("^%-*([%w_]+)=(.*)$")
    if not k then
      error(("bad argument %q: overrides are key=value (e.g. batch_size=64).\nValid keys: %s"):format(a, valid_keys()), 0)
    end
    out[k] = v
    order[#order + 1] = k
  end
  return out, order
end

function R.resolve(cfg, args)
  local c = R.defaults()
  for k, v in pairs(cfg or {}) do
    if type(k) ~= "string" or R.TYPE[k] == nil then unknown(tostring(k), " in the recipe") end
    c[k] = R.convert(k, v)
  end
  -- args: the script's `arg` (a list of "key=value", maybe with arg[0]) or a {key = value} map
  local over = args or {}
  if #over > 0 or over[0] ~= nil then over = R.parse_args(args) end
  for k, v in pairs(over or {}) do
    if R.TYPE[k] == nil then unknown(k, " on the command line") end
    c[k] = R.convert(k, v)
  end
  if c.use_fp16 then error("config: use_fp16 is not supported (the engine trains in float32)", 0) end
  if c.schedule_sampler ~= "uniform" and c.schedule_sampler ~= "loss-second-moment" then
    error(("config key 'schedule_sampler': %q (expected uniform or loss-second-moment)"):format(c.schedule_sampler), 0)
  end
  if c.device ~= "cpu" and c.device ~= "cuda" then
    error(("config key 'device': %q (expected cpu or cuda)"):format(c.device), 0)
  end
  if not require("iddpm.device").PRECISIONS[c.precision] then
    error(("config key 'precision': %q (expected auto, fp32, tf32 or bf16)"):format(c.precision), 0)
  end
  if type(c.noise_schedule) == "table" then   -- T is the table's length
    local n = #c.noise_schedule
    if cfg and cfg.diffusion_steps ~= nil or over.diffusion_steps ~= nil then
      if c.diffusion_steps ~= n then
        error(("config: diffusion_steps = %d but the noise_schedule table has %d betas"):format(c.diffusion_steps, n), 0)
      end
    end
    c.diffusion_steps = n
  end
  if c.batch_size < 1 then error("config key 'batch_size' must be >= 1", 0) end
  for r in c.ema_rate:gmatch("[^,]+") do
    local x = tonumber(r)
    if not x or x < 0 or x > 1 then error(("config key 'ema_rate': %q is not a rate in [0,1]"):format(r), 0) end
  end
  return c
end

-- a function or table noise_schedule in words (nil for anything else)
function R.schedule_name(v)
  if type(v) == "function" then return "function alpha_bar(t) (from the recipe)" end
  if type(v) == "table" then return ("table of %d betas (from the recipe)"):format(#v) end
end

function R.describe(c)
  local lines = {}
  for _, k in ipairs(R.KEYS) do
    local v = c[k[1]]
    local s = type(v) == "string" and ("%q"):format(v) or R.schedule_name(v) or tostring(v)
    lines[#lines + 1] = ("  %-24s %s%s"):format(k[1], s, v ~= k[3] and "   *" or "")
  end
  return table.concat(lines, "\n")
end

-- load a recipe file and return its table without training
function R.load(path)
  local chunk, err = loadfile(path)
  if not chunk then error(err, 0) end
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
