-- iddpm/canvas.lua — a small raster canvas for the pictures iddpm writes (loss plots,
-- labels on sample strips): pixels in a Lua array, lines, rectangles and text in a 5x7
-- bitmap font (digits, capital letters, a little punctuation; lower case is drawn in
-- capitals), converted to and from uint8 image tensors (H,W,C) with C = 1 or 3.
--
--   local K = require "iddpm.canvas"
--   local cv = K.new(W, H, {255, 255, 255})      -- or K.from_tensor(u8 (H,W,C))
--   cv:set(x, y, rgb); cv:get(x, y); cv:rect(x, y, w, h, rgb); cv:line(x0, y0, x1, y1, rgb, thick)
--   cv:text(x, y, "LOSS 0.05", rgb, scale); K.text_width("...", scale)
--   cv:tensor() -> uint8 (H,W,C); cv:png(path [, key, text])
-- Coordinates are 0-based pixels, x to the right, y down (image convention).
local T = require "iddpm.tensor"
local io_ = require "iddpm.io"

local K = {}

-- ---------------------------------------------------------------- the font
-- Each glyph: 7 rows of 5 columns, '#' = ink. Drawn by hand for this file.
local GLYPHS = {
  ["0"] = ".###. #...# #..## #.#.# ##..# #...# .###.",
  ["1"] = "..#.. .##.. ..#.. ..#.. ..#.. ..#.. .###.",
  ["2"] = ".###. #...# ....# ...#. ..#.. .#... #####",
  ["3"] = "####. ....# ....# .###. ....# ....# ####.",
  ["4"] = "...#. ..##. .#.#. #..#. ##### ...#. ...#.",
  ["5"] = "##### #.... ####. ....# ....# #...# .###.",
  ["6"] = "..##. .#... #.... ####. #...# #...# .###.",
  ["7"] = "##### ....# ...#. ..#.. .#... .#... .#...",
  ["8"] = ".###. #...# #...# .###. #...# #...# .###.",
  ["9"] = ".###. #...# #...# .#### ....# ...#. .##..",
  A = ".###. #...# #...# ##### #...# #...# #...#",
  B = "####. #...# #...# ####. #...# #...# ####.",
  C = ".###. #...# #.... #.... #.... #...# .###.",
  D = "####. #...# #...# #...# #...# #...# ####.",
  E = "##### #.... #.... ####. #.... #.... #####",
  F = "##### #.... #.... ####. #.... #.... #....",
  G = ".###. #...# #.... #.### #...# #...# .####",
  H = "#...# #...# #...# ##### #...# #...# #...#",
  I = ".###. ..#.. ..#.. ..#.. ..#.. ..#.. .###.",
  J = "..### ...#. ...#. ...#. ...#. #..#. .##..",
  K = "#...# #..#. #.#.. ##... #.#.. #..#. #...#",
  L = "#.... #.... #.... #.... #.... #.... #####",
  M = "#...# ##.## #.#.# #.#.# #...# #...# #...#",
  N = "#...# #...# ##..# #.#.# #..## #...# #...#",
  O = ".###. #...# #...# #...# #...# #...# .###.",
  P = "####. #...# #...# ####. #.... #.... #....",
  Q = ".###. #...# #...# #...# #.#.# #..#. .##.#",
  R = "####. #...# #...# ####. #.#.. #..#. #...#",
  S = ".#### #.... #.... .###. ....# ....# ####.",
  T = "##### ..#.. ..#.. ..#.. ..#.. ..#.. ..#..",
  U = "#...# #...# #...# #...# #...# #...# .###.",
  V = "#...# #...# #...# #...# #...# .#.#. ..#..",
  W = "#...# #...# #...# #.#.# #.#.# #.#.# .#.#.",
  X = "#...# #...# .#.#. ..#.. .#.#. #...# #...#",
  Y = "#...# #...# .#.#. ..#.. ..#.. ..#.. ..#..",
  Z = "##### ....# ...#. ..#.. .#... #.... #####",
  [" "] = "..... ..... ..... ..... ..... ..... .....",
  ["."] = "..... ..... ..... ..... ..... .##.. .##..",
  [","] = "..... ..... ..... ..... .##.. ..#.. .#...",
  ["-"] = "..... ..... ..... ##### ..... ..... .....",
  ["+"] = "..... ..#.. ..#.. ##### ..#.. ..#.. .....",
  [":"] = "..... .##.. .##.. ..... .##.. .##.. .....",
  ["/"] = "....# ....# ...#. ..#.. .#... #.... #....",
  ["("] = "...#. ..#.. .#... .#... .#... ..#.. ...#.",
  [")"] = ".#... ..#.. ...#. ...#. ...#. ..#.. .#...",
  ["="] = "..... ..... ##### ..... ##### ..... .....",
  ["_"] = "..... ..... ..... ..... ..... ..... #####",
  ["%"] = "##..# ##..# ...#. ..#.. .#... #..## #..##",
  ["*"] = "..... #.#.# .###. ##### .###. #.#.# .....",
  ["?"] = ".###. #...# ....# ...#. ..#.. ..... ..#..",
  ["^"] = "..#.. .#.#. #...# ..... ..... ..... .....",
  ["'"] = "..#.. ..#.. ..... ..... ..... ..... .....",
  ["["] = ".###. .#... .#... .#... .#... .#... .###.",
  ["]"] = ".###. ...#. ...#. ...#. ...#. ...#. .###.",
}
K.GLYPH_W, K.GLYPH_H, K.ADVANCE = 5, 7, 6

-- glyph -> list of 7 rows, each a list of 5 booleans (unknown characters: "?")
local BITS = {}
for ch, rows in pairs(GLYPHS) do
  local g = {}
  for row in rows:gmatch("%S+") do
    assert(#row == 5, "canvas: glyph " .. ch .. " has a row of " .. #row)
    local r = {}
    for i = 1, 5 do r[i] = row:sub(i, i) == "#" end
    g[#g + 1] = r
  end
  assert(#g == 7, "canvas: glyph " .. ch .. " has " .. #g .. " rows")
  BITS[ch] = g
end
function K.glyph(ch) return BITS[ch:upper()] or BITS["?"] end

function K.text_width(s, scale)
  scale = scale or 1
  if #s == 0 then return 0 end
  return (#s * K.ADVANCE - 1) * scale
end
function K.text_height(scale) return K.GLYPH_H * (scale or 1) end

-- ---------------------------------------------------------------- the canvas

local Canvas = {}
Canvas.__index = Canvas
K.Canvas = Canvas

-- W x H pixels of C channels (3 unless given), filled with bg ({r,g,b}, white default)
function K.new(W, H, bg, C)
  W, H = math.tointeger(W), math.tointeger(H)
  if not W or not H or W < 1 or H < 1 then error(("canvas.new: size %sx%s is not positive integers"):format(W, H), 2) end
  local self = setmetatable({W = W, H = H, C = C or 3, px = {}}, Canvas)
  bg = bg or {255, 255, 255}
  local px, nc = self.px, self.C
  local v = self:_color(bg)
  for i = 0, W * H - 1 do
    for c = 1, nc do px[i * nc + c] = v[c] end
  end
  return self
end

-- a copy of a uint8 image (H,W,C) or (H,W)
function K.from_tensor(u)
  if not T.is_tensor(u) or u:dtype() ~= "uint8" or (u:dim() ~= 3 and u:dim() ~= 2) then
    error("canvas.from_tensor: expected a uint8 tensor (H,W,C) or (H,W)", 2)
  end
  local s = u:shape()
  local self = setmetatable({W = s[2], H = s[1], C = s[3] or 1}, Canvas)
  self.px = u:contiguous():totable()
  return self
end

-- {r,g,b} -> this canvas's channels (grey = mean for C = 1)
function Canvas:_color(rgb)
  if self.C == 1 then return {math.floor((rgb[1] + rgb[2] + rgb[3]) / 3 + 0.5)} end
  return rgb
end

function Canvas:set(x, y, rgb)
  x, y = math.floor(x), math.floor(y)
  if x < 0 or y < 0 or x >= self.W or y >= self.H then return end
  local nc, i = self.C, (y * self.W + x) * self.C
  if nc == 1 then self.px[i + 1] = math.floor((rgb[1] + rgb[2] + rgb[3]) / 3 + 0.5)
  else self.px[i + 1], self.px[i + 2], self.px[i + 3] = rgb[1], rgb[2], rgb[3] end
end

-- -> r, g, b (grey canvases: the same value three times)
function Canvas:get(x, y)
  local i = (y * self.W + x) * self.C
  if self.C == 1 then local v = self.px[i + 1] return v, v, v end
  return self.px[i + 1], self.px[i + 2], self.px[i + 3]
end

function Canvas:rect(x, y, w, h, rgb)
  for yy = math.max(0, y), math.min(self.H - 1, y + h - 1) do
    for xx = math.max(0, x), math.min(self.W - 1, x + w - 1) do self:set(xx, yy, rgb) end
  end
end

-- outline of a rectangle
function Canvas:box(x, y, w, h, rgb)
  self:rect(x, y, w, 1, rgb); self:rect(x, y + h - 1, w, 1, rgb)
  self:rect(x, y, 1, h, rgb); self:rect(x + w - 1, y, 1, h, rgb)
end

-- a line (Bresenham); thick = 2 adds the pixel below (and right for steep lines)
function Canvas:line(xa, ya, xb, yb, rgb, thick)
  xa, ya, xb, yb = math.floor(xa + 0.5), math.floor(ya + 0.5), math.floor(xb + 0.5), math.floor(yb + 0.5)
  local dx, dy = math.abs(xb - xa), -math.abs(yb - ya)
  local stx, sty = xa < xb and 1 or -1, ya < yb and 1 or -1
  local steep = -dy > dx
  local err = dx + dy
  while true do
    self:set(xa, ya, rgb)
    if thick and thick > 1 then
      if steep then self:set(xa + 1, ya, rgb) else self:set(xa, ya + 1, rgb) end
    end
    if xa == xb and ya == yb then break end
    local e2 = 2 * err
    if e2 >= dy then err = err + dy; xa = xa + stx end
    if e2 <= dx then err = err + dx; ya = ya + sty end
  end
end

-- text with its top-left corner at (x, y), each font pixel a scale x scale block
function Canvas:text(x, y, s, rgb, scale)
  scale = scale or 1
  s = tostring(s)
  for k = 1, #s do
    local g = K.glyph(s:sub(k, k))
    local gx = x + (k - 1) * K.ADVANCE * scale
    for r = 1, 7 do
      local row = g[r]
      for c = 1, 5 do
        if row[c] then self:rect(gx + (c - 1) * scale, y + (r - 1) * scale, scale, scale, rgb) end
      end
    end
  end
end

-- text aligned around (x, y): ax, ay in {"left","center","right"} / {"top","middle","bottom"}
function Canvas:label(x, y, s, rgb, scale, ax, ay)
  scale = scale or 1
  local w, h = K.text_width(s, scale), K.text_height(scale)
  if ax == "center" then x = x - w // 2 elseif ax == "right" then x = x - w end
  if ay == "middle" then y = y - h // 2 elseif ay == "bottom" then y = y - h end
  self:text(x, y, s, rgb, scale)
  return x, y, w, h
end

function Canvas:tensor()
  return T.from_table(self.px, {self.H, self.W, self.C}, "uint8")
end

function Canvas:png(path, key, text)
  if key then io_.png_write(path, self:tensor(), key, text) else io_.png_write(path, self:tensor()) end
  return path
end

return K
