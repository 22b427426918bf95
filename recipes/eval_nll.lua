-- recipes/eval_nll.lua — moved to tools/eval_nll.lua (a tool, not a recipe); this forwarder is kept for one release.
io.stderr:write("note: recipes/eval_nll.lua is now tools/eval_nll.lua; the old path will go away\n")
return assert(loadfile((debug.getinfo(1, "S").source:match("^@(.-)[^/]*/[^/]*$") or "") .. "tools/eval_nll.lua"))(...)
