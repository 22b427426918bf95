-- iddpm/cli/sample.lua — `iddpm sample key=value ...`: the sampling recipe
-- (iddpm.sample.main; the same as `iddpm run recipes/sample.lua ...`). `help` anywhere
-- lists every key with its value; --dry-run checks everything and lists the outputs.
return function(...)
  return require("iddpm.sample").main(...)
end
