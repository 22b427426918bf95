-- iddpm/doc.lua — the docstrings of the public API, one table per module, the single
-- source of help(x) in the REPL and of docs/API.md (`make docs` writes it from
-- M.markdown(); tests/lua/test_repl.lua checks the committed page is up to date).
-- Each entry: the call's signature on the first line, then what it does.
local M = {}

M.modules = {
  {name = "iddpm", doc = [[
iddpm — Improved DDPM on a C engine. Modules (each documented: help "iddpm.tensor"):
  iddpm.tensor (T)  tensors, math, layers' ops, autograd
  iddpm.nn          UNet and layers (Module classes)
  iddpm.diffusion   Gaussian diffusion: schedules, losses, samplers
  iddpm.optim       AdamW, EMA
  iddpm.data        image data sets and loaders
  iddpm.train / iddpm.sample / iddpm.recipe   the training and sampling loops
  iddpm.metrics     FID, precision/recall;  iddpm.image  PNG/GIF writing
In the REPL: help(x) for a value, help "T.conv2d" or help "x:sum" by name; Tab completes
globals, fields (iddpm.tensor.ra<Tab>) and methods (x:su<Tab>).]],
   entries = {}},

  {name = "tensor", doc = [[
iddpm.tensor (written T below): construction, math and autograd of Tensors. Positions
and dims are 1-based; negative dims and positions count from the end (-1 the last).
A tensor prints its values (PyTorch's layout); x[i] is the view at position i of dim 1;
methods: help "Tensor".]],
   entries = {
    {"tensor", "T.tensor(nested [, dtype]) -> Tensor", [[
A tensor from nested Lua tables, shape inferred: T.tensor{{1,2},{3,4}} is (2,2).
Ragged input raises an error naming the position. dtype defaults to float32, or int64
when every value is an integer and dtype is not given as "float32".]]},
    {"from_table", "T.from_table(flat, shape [, dtype]) -> Tensor", "A tensor of shape from a flat Lua array (row-major)."},
    {"zeros", "T.zeros(shape... [, dtype]) -> Tensor", "Zeros; shape as integers or one table: T.zeros(2, 3) or T.zeros({2, 3})."},
    {"ones", "T.ones(shape... [, dtype]) -> Tensor", "Ones."},
    {"empty", "T.empty(shape... [, dtype]) -> Tensor", "Uninitialised memory."},
    {"full", "T.full(shape, value [, dtype]) -> Tensor", "Every element set to value."},
    {"arange", "T.arange([start,] stop [, step] [, dtype]) -> Tensor", "start, start+step, ... below stop; int64 when the bounds are integers."},
    {"randn", "T.randn(shape [, generator] [, dtype] [, device]) -> Tensor", "Standard normal samples; the same numbers on every device."},
    {"rand", "T.rand(shape [, generator] [, dtype] [, device]) -> Tensor", "Uniform samples in [0, 1)."},
    {"randint", "T.randint(lo, hi, shape [, generator]) -> Tensor", "int64 samples in [lo, hi)."},
    {"generator", "T.generator(seed [, stream]) -> Generator", "An independent counter-based random stream."},
    {"default_generator", "T.default_generator() -> Generator", "The stream used when none is passed."},
    {"manual_seed", "T.manual_seed(seed)", "Reseeds the default generator."},
    {"cat", "T.cat({a, b, ...}, dim) -> Tensor", "Concatenation along dim (1-based)."},
    {"where", "T.where(cond, a, b) -> Tensor", "Elementwise: a where cond is nonzero, else b (a, b tensors or numbers; broadcasting)."},
    {"conv2d", "T.conv2d(x, w [, b] [, stride=1] [, padding=0 | {ph, pw}]) -> Tensor", [[
2-D convolution: x (N,C,H,W), w (O,C,kh,kw), b (O) -> (N,O,H',W').]]},
    {"conv2d_relu", "T.conv2d_relu(x, w [, b] [, stride=1] [, padding=0 | {ph, pw}]) -> Tensor",
      "max(0, conv2d(...)), the ReLU done in place on the conv's output (forward only, CPU; the FID Inception)."},
    {"group_norm", "T.group_norm(x, groups, weight, bias [, scale, shift, silu=false, eps=1e-5]) -> Tensor", [[
Group normalisation of x (N,C,...) over groups of channels, then * weight + bias;
optional per-sample scale/shift (x * (1 + scale) + shift) and SiLU fused in.]]},
    {"norm_conv", "T.norm_conv(x, groups, gamma, beta, w, b [, opts]) -> Tensor", "conv2d(dropout(group_norm(x))) fused (the UNet's ResBlock tail)."},
    {"avg_pool2d", "T.avg_pool2d(x [, k=2, stride=k, pad=0, count_include_pad=true]) -> Tensor", "Average pooling."},
    {"max_pool2d", "T.max_pool2d(x, k [, stride=k, pad=0]) -> Tensor", "Max pooling (forward only)."},
    {"upsample_nearest", "T.upsample_nearest(x [, factor=2]) -> Tensor", "Nearest-neighbour 2x upsampling of (N,C,H,W) (only factor 2)."},
    {"resize_bilinear", "T.resize_bilinear(x, {H, W} [, mode=\"tf1\" | \"half_pixel\"]) -> Tensor", "Bilinear resize (forward only)."},
    {"timestep_embedding", "T.timestep_embedding(t, dim [, max_period=10000]) -> Tensor", "Sinusoidal embedding (N) -> (N,dim)."},
    {"dropout", "T.dropout(x, p [, generator]) -> Tensor", "Zeroes elements with probability p, scales the rest by 1/(1-p)."},
    {"qkv_attention", "T.qkv_attention(qkv, heads) -> Tensor", "Multi-head self-attention from packed (N, 3*heads*ch, T) qkv -> (N, heads*ch, T)."},
    {"no_grad", "T.no_grad(fn, ...) -> fn's results", "Runs fn with autograd recording off (restored even on error)."},
    {"set_grad_enabled", "T.set_grad_enabled(on) -> previous", "Turns autograd recording on or off."},
    {"gradcheck", "T.gradcheck(fn, {x1, ...} [, {eps=1e-6, nmax=64, seed=0}]) -> worst rel err", "Tape gradients against central differences."},
    {"is_tensor", "T.is_tensor(v) -> boolean", "Whether v is a Tensor."},
    {"live_bytes", "T.live_bytes() -> integer", "Bytes held by live tensors."},
    {"scope", "T.scope(fn, ...) -> fn's results", "Runs fn; releases every tensor it created and did not return (returned ones, also inside tables, pass to the enclosing scope). Every Module:forward is one."},
    {"keep", "T.keep(t, ...) -> t, ...", "The tensors outlive every scope (module state, caches)."},
    {"scope_depth", "T.scope_depth() -> integer", "Scopes open now (0: tensors are left to the collector)."},
    {"peak_bytes", "T.peak_bytes([reset]) -> integer", "Most live tensor bytes seen at a tensor's creation since the last reset."},
    {"load", "T.load(path) -> {name = Tensor}, metadata", "Reads a safetensors file."},
    {"save", "T.save(path, {name = Tensor} [, metadata])", "Writes a safetensors file."},
  }},

  {name = "Tensor", doc = [[
Tensor: an n-dim array (float32, float64, bfloat16, int64, uint8) on the CPU or GPU.
Fields: x.requires_grad (settable), x.grad, x.grad_fn, x.is_leaf. x[i]: the view at
position i of dim 1 (1-based, negative from the end). Arithmetic: + - * / ^ unary -,
with numbers or broadcasting tensors. Printing shows the values (more than 1000
elements: the first and last 3 of each dim).]],
   entries = {
    {"item", "x:item() -> number", "The value of a one-element tensor (an error names the shape otherwise)."},
    {"totable", "x:totable() -> {numbers}", "All values, flat, row-major."},
    {"get", "x:get(i, j, ...) -> number", "One element by 1-based positions (negative from the end)."},
    {"shape", "x:shape() -> {sizes}", "The sizes of the dims."},
    {"size", "x:size([dim]) -> integer | {sizes}", "The size of dim, or all sizes."},
    {"dim", "x:dim() -> integer", "The number of dims."},
    {"numel", "x:numel() -> integer", "The number of elements."},
    {"dtype", "x:dtype() -> string", "\"float32\", \"float64\", \"bfloat16\", \"int64\" or \"uint8\"."},
    {"device", "x:device() -> string", "\"cpu\" or \"cuda\"."},
    {"stride", "x:stride() -> {strides}", "Strides in elements."},
    {"summary", "x:summary() -> string", "One line: shape, dtype, device (no values)."},
    {"is_contiguous", "x:is_contiguous() -> boolean", "Row-major dense memory."},
    {"is_channels_last", "x:is_channels_last() -> boolean", "NHWC memory."},
    {"reshape", "x:reshape(shape) -> Tensor", "Same values, new shape (one -1 inferred); a view when the strides allow."},
    {"view", "x:view(shape) -> Tensor", "Same as reshape."},
    {"narrow", "x:narrow(dim, start, len) -> Tensor", "The view of positions start..start+len-1 of dim."},
    {"permute", "x:permute({dims}) -> Tensor", "Reorders the dims (a view)."},
    {"transpose", "x:transpose([d1=1, d2=2]) -> Tensor", "Swaps two dims (a view)."},
    {"expand", "x:expand(shape) -> Tensor", "Broadcasts size-1 dims (a view)."},
    {"index_select", "x:index_select(dim, idx) -> Tensor", "The positions idx (an int tensor or Lua array, 1-based) of dim."},
    {"contiguous", "x:contiguous() -> Tensor", "Row-major copy unless already so."},
    {"channels_last", "x:channels_last([dtype]) -> Tensor", "A channels-last (NHWC memory) copy."},
    {"clone", "x:clone() -> Tensor", "A copy."},
    {"detach", "x:detach() -> Tensor", "The same values outside autograd."},
    {"float", "x:float() -> Tensor", "Cast to float32."},
    {"double", "x:double() -> Tensor", "Cast to float64."},
    {"bfloat16", "x:bfloat16() -> Tensor", "Cast to bfloat16."},
    {"long", "x:long() -> Tensor", "Cast to int64."},
    {"byte", "x:byte() -> Tensor", "Cast to uint8."},
    {"cpu", "x:cpu() -> Tensor", "On the CPU (x itself if there already)."},
    {"cuda", "x:cuda() -> Tensor", "On the GPU."},
    {"to", "x:to(device | dtype) -> Tensor", "x:to(\"cuda\"), x:to(\"float64\")."},
    {"fill_", "x:fill_(v) -> x", "Sets every element to v, in place."},
    {"zero_", "x:zero_() -> x", "Sets every element to 0, in place."},
    {"copy_", "x:copy_(src) -> x", "Copies src's values into x, in place."},
    {"free", "x:free()", "Releases the memory now (x is unusable after)."},
    {"backward", "x:backward([grad])", "Backpropagates from x (grad defaults to ones for one element)."},
    {"zero_grad", "x:zero_grad()", "Drops x.grad."},
    {"add", "x:add(y) -> Tensor", "x + y (broadcasting; y a tensor or number)."},
    {"sub", "x:sub(y) -> Tensor", "x - y."},
    {"mul", "x:mul(y) -> Tensor", "x * y."},
    {"div", "x:div(y) -> Tensor", "x / y."},
    {"pow", "x:pow(p) -> Tensor", "x ^ p."},
    {"affine", "x:affine(scale, shift) -> Tensor", "x * scale + shift."},
    {"matmul", "x:matmul(y) -> Tensor", "Matrix product (batched over leading dims)."},
    {"neg", "x:neg() -> Tensor", "-x."},
    {"abs", "x:abs() -> Tensor", "|x|."},
    {"sign", "x:sign() -> Tensor", "-1, 0 or 1."},
    {"exp", "x:exp() -> Tensor", "e^x."},
    {"log", "x:log() -> Tensor", "Natural log."},
    {"sqrt", "x:sqrt() -> Tensor", "Square root."},
    {"rsqrt", "x:rsqrt() -> Tensor", "1 / sqrt(x)."},
    {"reciprocal", "x:reciprocal() -> Tensor", "1 / x."},
    {"square", "x:square() -> Tensor", "x * x."},
    {"sin", "x:sin() -> Tensor", "Sine."},
    {"cos", "x:cos() -> Tensor", "Cosine."},
    {"tanh", "x:tanh() -> Tensor", "Hyperbolic tangent."},
    {"sigmoid", "x:sigmoid() -> Tensor", "1 / (1 + e^-x)."},
    {"silu", "x:silu() -> Tensor", "x * sigmoid(x)."},
    {"floor", "x:floor() -> Tensor", "Rounded down."},
    {"clamp", "x:clamp([lo] [, hi]) -> Tensor", "Limited to [lo, hi] (either may be nil)."},
    {"maximum", "x:maximum(y) -> Tensor", "Elementwise max."},
    {"minimum", "x:minimum(y) -> Tensor", "Elementwise min."},
    {"eq", "x:eq(y) -> Tensor", "1 where x == y, else 0 (also ne, lt, le, gt, ge)."},
    {"ne", "x:ne(y) -> Tensor", "1 where x ~= y."},
    {"lt", "x:lt(y) -> Tensor", "1 where x < y."},
    {"le", "x:le(y) -> Tensor", "1 where x <= y."},
    {"gt", "x:gt(y) -> Tensor", "1 where x > y."},
    {"ge", "x:ge(y) -> Tensor", "1 where x >= y."},
    {"sum", "x:sum([dim [, keepdim]]) -> Tensor", "Sum of all elements, or along dim."},
    {"mean", "x:mean([dim [, keepdim]]) -> Tensor", "Mean of all elements, or along dim."},
    {"mean_flat", "x:mean_flat() -> Tensor", "Mean over every dim but the first: (N,...) -> (N)."},
    {"var", "x:var([dim [, keepdim [, unbiased=true]]]) -> Tensor", "Variance (unbiased, n-1, unless unbiased=false)."},
    {"max", "x:max([dim [, keepdim]]) -> Tensor [, positions]", "Largest element, or along dim (then also the 1-based positions); x:max(y) with a tensor or float y is maximum."},
    {"min", "x:min([dim [, keepdim]]) -> Tensor [, positions]", "Smallest element, or along dim (then also the 1-based positions)."},
    {"softmax", "x:softmax([dim=-1]) -> Tensor", "exp(x) / sum(exp(x)) along dim."},
    {"logsumexp", "x:logsumexp(dim [, keepdim]) -> Tensor", "log(sum(exp(x))) along dim, stable."},
  }},
}

local by_name, module_of = {}, {}
for _, m in ipairs(M.modules) do
  by_name[m.name] = m.doc
  for _, e in ipairs(m.entries) do
    local key = m.name == "Tensor" and "Tensor:" .. e[1] or m.name .. "." .. e[1]
    by_name[key] = e[2] .. "\n" .. e[3]
    module_of[key] = m
  end
end

-- "T.conv2d", "iddpm.tensor.conv2d", "x:sum", "Tensor.sum" -> the key of the entry.
function M.normalize(name)
  name = name:gsub("^iddpm%.(.)", "%1")
  name = name:gsub("^T%.", "tensor.")
  if name == "T" then return "tensor" end
  local obj, meth = name:match("^([%w_]+):([%w_]+)$")
  if obj then return "Tensor:" .. meth end
  meth = name:match("^Tensor%.([%w_]+)$")
  if meth then return "Tensor:" .. meth end
  return name
end

-- The text of an entry; a module's text ends with its members' signatures.
function M.text(name)
  local text = by_name[name]
  if not text then return nil end
  for _, m in ipairs(M.modules) do
    if m.name == name and #m.entries > 0 then
      local lines = {text, "", "members:"}
      for _, e in ipairs(m.entries) do lines[#lines + 1] = "  " .. e[2] end
      return table.concat(lines, "\n")
    end
  end
  return text
end

function M.names()
  local out = {}
  for k in pairs(by_name) do out[#out + 1] = k end
  table.sort(out)
  return out
end

-- The documented modules that are loaded, by name: {tensor = iddpm.tensor, ...}.
function M.modules_loaded(iddpm)
  local out = {}
  for _, m in ipairs(M.modules) do
    local t = m.name ~= "iddpm" and m.name ~= "Tensor" and rawget(iddpm, m.name)
    if type(t) == "table" then out[m.name] = t end
  end
  return out
end

-- docs/API.md
function M.markdown()
  local out = {"# iddpm API reference", "",
    "Generated from lua/iddpm/doc.lua by `make docs` (the same text as `help(...)` in the REPL).", ""}
  for _, m in ipairs(M.modules) do
    out[#out + 1] = "## " .. (m.name == "Tensor" and "Tensor methods" or m.name == "iddpm" and "iddpm" or "iddpm." .. m.name)
    out[#out + 1] = ""
    out[#out + 1] = "```"
    out[#out + 1] = m.doc
    out[#out + 1] = "```"
    out[#out + 1] = ""
    for _, e in ipairs(m.entries) do
      out[#out + 1] = "### `" .. e[2] .. "`"
      out[#out + 1] = ""
      out[#out + 1] = e[3]
      out[#out + 1] = ""
    end
  end
  return table.concat(out, "\n")
end

return M
