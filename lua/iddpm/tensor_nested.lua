-- iddpm/tensor_nested.lua — T.tensor(nested [, dtype]): a tensor from nested Lua tables,
-- shape inferred from the nesting: T.tensor{{1,2},{3,4}} -> shape (2,2). Ragged input
-- raises an error naming the first position whose length (or kind) differs. With no
-- dtype: int64 when every value is a Lua integer, else float32.
return function(T)
  return function(data, dtype)
    if T.is_tensor(data) then return data:clone() end
    if type(data) == "number" then
      return T.from_table({data}, {}, dtype or (math.type(data) == "integer" and "int64" or "float32"))
    end
    if type(data) ~= "table" then
      error(("tensor: expected a number or a (nested) table of numbers, got a %s"):format(type(data)), 2)
    end
    local shape, t = {}, data   -- the shape, from the first element at each depth
    while type(t) == "table" do
      shape[#shape + 1] = #t
      t = t[1]
    end
    local flat, all_int = {}, true
    local function walk(v, depth, where)
      if depth > #shape then
        if type(v) ~= "number" then
          error(("tensor: element at %s is a %s, not a number"):format(where, type(v)), 0)
        end
        if math.type(v) ~= "integer" then all_int = false end
        flat[#flat + 1] = v
        return
      end
      if type(v) ~= "table" then
        error(("tensor: ragged nesting: at %s a %s where a table of %d was expected (shape (%s))")
          :format(where, type(v), shape[depth], table.concat(shape, ",")), 0)
      end
      if #v ~= shape[depth] then
        error(("tensor: ragged nesting: at %s %d elements where %d were expected (shape (%s))")
          :format(where, #v, shape[depth], table.concat(shape, ",")), 0)
      end
      for i = 1, #v do walk(v[i], depth + 1, where == "the top" and ("[%d]"):format(i) or where .. ("[%d]"):format(i)) end
    end
    local ok, err = pcall(walk, data, 1, "the top")
    if not ok then error(err, 2) end
    return T.from_table(flat, shape, dtype or (all_int and #flat > 0 and "int64" or "float32"))
  end
end
