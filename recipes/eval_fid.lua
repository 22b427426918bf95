-- recipes/eval_fid.lua — moved to tools/eval_fid.lua (a tool, not a recipe); this forwarder is kept for one release.
io.stderr:write("note: recipes/eval_fid.lua is now tools/eval_fid.lua; the old path will go away\n")
return assert(loadfile((debug.getinfo(1, "S").source:match("^@(.-)[^/]*/[^/]*$") or "") .. "tools/eval_fid.lua"))(...)
