-- recipes/fid_stats.lua — moved to tools/fid_stats.lua (a tool, not a recipe); this forwarder is kept for one release.
io.stderr:write("note: recipes/fid_stats.lua is now tools/fid_stats.lua; the old path will go away\n")
return assert(loadfile((debug.getinfo(1, "S").source:match("^@(.-)[^/]*/[^/]*$") or "") .. "tools/fid_stats.lua"))(...)
