-- iddpm/timefmt.lua — durations as people read them, for progress lines and reports:
--   timefmt.duration(s [, decimals [, sep]])  -> "42s" / "4.2s", "3m05s", "1h02m"; "?" for nil, NaN or inf
-- decimals: digits after the point below a minute (0 by default); sep: between the
-- units ("" by default; the run report uses " ").
local timefmt = {}

function timefmt.duration(s, decimals, sep)
  if s == nil or s ~= s or s == math.huge or s == -math.huge then return "?" end
  sep = sep or ""
  if s < 59.5 then return ("%." .. (decimals or 0) .. "fs"):format(s) end
  s = math.floor(s + 0.5)
  if s >= 3600 then return ("%dh%s%02dm"):format(s // 3600, sep, s % 3600 // 60) end
  return ("%dm%s%02ds"):format(s // 60, sep, s % 60)
end

return timefmt
