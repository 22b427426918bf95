-- iddpm/cli/report.lua — `iddpm report RUN [out=FILE]`: write the run's HTML report
-- (iddpm.report: one self-contained page with the config, the loss plots, the sample
-- grids over time, throughput, checkpoints and evaluation results) and print its path.
return function(...)
  local args = {...}
  if #args == 0 or args[1] == "help" or args[1] == "--help" or args[1] == "-h" then
    print("usage: iddpm report RUN_DIR [out=FILE]\n\n" ..
      "Writes RUN_DIR/report.html (or FILE): one HTML file with every image inlined.\n" ..
      "Evaluation results are read from RUN_DIR/eval/*.json.")
    if #args == 0 then error("report: give the run directory", 0) end
    return
  end
  local run, out = nil, nil
  for _, a in ipairs(args) do
    local k, v = a:match("^([%w_]+)=(.*)$")
    if k == "out" then out = v
    elseif k then error(("report: unknown option '%s' (valid: out=FILE)"):format(k), 0)
    elseif run then error(("report: one run directory, got %s and %s"):format(run, a), 0)
    else run = a end
  end
  if not run then error("report: give the run directory", 0) end
  local ok, path = pcall(require("iddpm.report").write, run, out)
  if not ok then error(tostring(path):gsub("^[^:]*report%.lua:%d+: ", ""), 0) end
  print(path)
  return path
end
