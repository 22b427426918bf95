#!/usr/bin/python3
"""convert_official.py — an official improved-diffusion (or mmgeneration) checkpoint
to an iddpm checkpoint (safetensors, format iddpm-ckpt-1) that `iddpm sample` reads.

    /usr/bin/python3 tools/convert_official.py MODEL.pt OUT.safetensors \\
        --image_size 32 --num_channels 128 --num_res_blocks 3 --learn_sigma True \\
        --dropout 0.3 --diffusion_steps 4000 --noise_schedule cosine

MODEL.pt is what the official train_util.py saves (model%06d.pt or ema_0.9999_%06d.pt,
a pickled state_dict), or an mmgeneration checkpoint (.pth with "state_dict" holding
denoising_ema.* and denoising.* keys; EMA is used if present, see --mmgen_prefix).
The flags are the official ones (model_and_diffusion_defaults() of script_util.py,
same defaults, "True"/"False" for booleans), given as on the official command line.
Extras that the official scripts derive and we accept explicitly: --channel_mult 1,2
(default: from image_size like the official create_model), --in_channels 3,
--num_classes N (default: 1000 with --class_cond True, or the label embedding's rows).

The output holds model.<name> and ema_0.9999.<name> (both the converted weights: the
official files keep one set per file), metadata {format = "iddpm-ckpt-1", step,
config = JSON of the model and diffusion keys, ema_rates = [0.9999], source}.
Written with json + struct + numpy only (no safetensors package); the data starts
8-byte aligned and tensors are packed in name order. Needs Debian's python3-torch
(torch.load) and python3-numpy.

mmgeneration names (mmgen/models/architectures/ddpm/{denoising,modules}.py) are mapped
to the official ones: time_embedding.blocks.{0,2} -> time_embed.{0,2},
label_embedding -> label_emb, in_blocks/mid_blocks/out_blocks -> input_blocks/
middle_block/output_blocks, ResBlock conv_1.{0,2} -> in_layers.{0,2},
norm_with_embedding.norm -> out_layers.0, norm_with_embedding.embedding_layer.1 ->
emb_layers.1, conv_2.2 -> out_layers.3, shortcut -> skip_connection, attention proj ->
proj_out, downsample.downsample -> op, head out.gn / out.conv -> out.0 / out.2.
This mapping was written from mmgen's module source; it has NOT been checked against a
released mmgen checkpoint (none is available offline). The converter fails loudly on
any name or shape it cannot place (e.g. mmgen's 3x3 shortcut option).
"""
import argparse, json, re, struct, sys

import numpy as np

DEFAULTS = dict(image_size=64, num_channels=128, num_res_blocks=2, num_heads=4, num_heads_upsample=-1,
                attention_resolutions="16,8", dropout=0.0, learn_sigma=False, sigma_small=False,
                class_cond=False, diffusion_steps=1000, noise_schedule="linear", timestep_respacing="",
                use_kl=False, predict_xstart=False, rescale_timesteps=True, rescale_learned_sigmas=True,
                use_checkpoint=False, use_scale_shift_norm=True)
DEFAULT_MULT = {256: [1, 1, 2, 2, 4, 4], 64: [1, 2, 3, 4], 32: [1, 2, 2, 2], 28: [1, 2, 2]}
DTYPES = {np.dtype("<f4"): "F32", np.dtype("<f8"): "F64", np.dtype("<i8"): "I64", np.dtype("u1"): "U8",
          np.dtype("<f2"): "F16", np.dtype("<i4"): "I32"}


def write_safetensors(path, tensors, metadata):
    """tensors: name -> numpy array (C order, little-endian); metadata: str -> str."""
    header, blobs, off = {"__metadata__": metadata}, [], 0
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
        if a.dtype not in DTYPES:
            raise SystemExit(f"{name}: dtype {a.dtype} not supported")
        b = a.tobytes()
        header[name] = {"dtype": DTYPES[a.dtype], "shape": list(a.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)
    import os
    os.replace(tmp, path)


def str2bool(v):
    if isinstance(v, bool):
        return v
    if v.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if v.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError("boolean value expected")


MMGEN_RULES = [
    (r"^time_embedding\.blocks\.", "time_embed."),
    (r"^label_embedding\.", "label_emb."),
    (r"^in_blocks\.", "input_blocks."),
    (r"^mid_blocks\.", "middle_block."),
    (r"^out_blocks\.", "output_blocks."),
    (r"\.conv_1\.0\.", ".in_layers.0."),
    (r"\.conv_1\.2\.", ".in_layers.2."),
    (r"\.norm_with_embedding\.norm\.", ".out_layers.0."),
    (r"\.norm_with_embedding\.embedding_layer\.1\.", ".emb_layers.1."),
    (r"\.conv_2\.2\.", ".out_layers.3."),
    (r"\.shortcut\.", ".skip_connection."),
    (r"\.proj\.", ".proj_out."),
    (r"\.downsample\.", ".op."),
    (r"^out\.gn\.", "out.0."),
    (r"^out\.conv\.", "out.2."),
]


def mmgen_to_official(name):
    for pat, rep in MMGEN_RULES:
        name = re.sub(pat, rep, name)
    return name


def load_state_dict(path, mmgen_prefix):
    import torch
    obj = torch.load(path, map_location="cpu")
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    keys = list(obj.keys())
    prefixes = [mmgen_prefix] if mmgen_prefix else ["denoising_ema.", "denoising."]
    for p in prefixes:
        sub = {k[len(p):]: v for k, v in obj.items() if k.startswith(p)}
        if sub:
            return {mmgen_to_official(k): v for k, v in sub.items()}, "mmgen:" + p
    sd = {(k[7:] if k.startswith("module.") else k): v for k, v in obj.items()}
    if not any(k.startswith("input_blocks.") for k in sd):
        raise SystemExit(f"{path}: no official (input_blocks.*) or mmgen (denoising*.in_blocks.*) keys; "
                         f"first keys: {keys[:5]}")
    return sd, "official"


def expected_names(cfg):
    """The official UNet's parameter names and shapes for cfg (mirrors unet.py's topology)."""
    mc, emb = cfg["num_channels"], 4 * cfg["num_channels"]
    out = {}
    def conv(n, ci, co, k): out[n + ".weight"] = (co, ci, k, k); out[n + ".bias"] = (co,)
    def gn(n, c): out[n + ".weight"] = (c,); out[n + ".bias"] = (c,)
    def lin(n, ci, co): out[n + ".weight"] = (co, ci); out[n + ".bias"] = (co,)
    def res(n, ci, co):
        gn(n + ".in_layers.0", ci); conv(n + ".in_layers.2", ci, co, 3)
        lin(n + ".emb_layers.1", emb, 2 * co if cfg["use_scale_shift_norm"] else co)
        gn(n + ".out_layers.0", co); conv(n + ".out_layers.3", co, co, 3)
        if ci != co: conv(n + ".skip_connection", ci, co, 1)
    def attn(n, c):
        gn(n + ".norm", c)
        out[n + ".qkv.weight"] = (3 * c, c, 1); out[n + ".qkv.bias"] = (3 * c,)
        out[n + ".proj_out.weight"] = (c, c, 1); out[n + ".proj_out.bias"] = (c,)
    lin("time_embed.0", mc, emb); lin("time_embed.2", emb, emb)
    if cfg.get("num_classes"): out["label_emb.weight"] = (cfg["num_classes"], emb)
    attn_ds = {cfg["image_size"] // r for r in cfg["attention_resolutions"]}
    conv("input_blocks.0.0", cfg["in_channels"], mc, 3)
    chans, ch, ds, k = [mc], mc, 1, 1
    mult = cfg["channel_mult"]
    for level, m in enumerate(mult):
        for _ in range(cfg["num_res_blocks"]):
            res(f"input_blocks.{k}.0", ch, m * mc); ch = m * mc
            if ds in attn_ds: attn(f"input_blocks.{k}.1", ch)
            chans.append(ch); k += 1
        if level != len(mult) - 1:
            conv(f"input_blocks.{k}.0.op", ch, ch, 3); chans.append(ch); ds *= 2; k += 1
    res("middle_block.0", ch, ch); attn("middle_block.1", ch); res("middle_block.2", ch, ch)
    k = 0
    for level in range(len(mult) - 1, -1, -1):
        for i in range(cfg["num_res_blocks"] + 1):
            skip = chans.pop()
            res(f"output_blocks.{k}.0", ch + skip, mc * mult[level]); ch = mc * mult[level]
            j = 1
            if ds in attn_ds: attn(f"output_blocks.{k}.1", ch); j = 2
            if level and i == cfg["num_res_blocks"]:
                conv(f"output_blocks.{k}.{j}.conv", ch, ch, 3); ds //= 2
            k += 1
    gn("out.0", ch); conv("out.2", mc, cfg["out_channels"], 3)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input"); ap.add_argument("output")
    for k, v in DEFAULTS.items():
        ap.add_argument("--" + k, default=v, type=str2bool if isinstance(v, bool) else type(v))
    ap.add_argument("--channel_mult", default="")
    ap.add_argument("--in_channels", type=int, default=3)
    ap.add_argument("--num_classes", type=int, default=0)
    ap.add_argument("--step", type=int, default=0)
    ap.add_argument("--mmgen_prefix", default="", help="e.g. denoising. for the raw (non-EMA) mmgen weights")
    a = ap.parse_args(argv)

    sd, source = load_state_dict(a.input, a.mmgen_prefix)
    if a.channel_mult:
        mult = [int(x) for x in a.channel_mult.split(",")]
    elif a.image_size in DEFAULT_MULT:
        mult = DEFAULT_MULT[a.image_size]
    else:
        raise SystemExit(f"no default channel_mult for image_size {a.image_size}: pass --channel_mult")
    num_classes = a.num_classes or (1000 if a.class_cond else 0)
    if not num_classes and "label_emb.weight" in sd:
        num_classes = int(sd["label_emb.weight"].shape[0])
    cfg = dict(image_size=a.image_size, in_channels=a.in_channels, num_channels=a.num_channels,
               num_res_blocks=a.num_res_blocks, channel_mult=mult,
               attention_resolutions=[int(x) for x in str(a.attention_resolutions).split(",") if x],
               num_heads=a.num_heads, num_heads_upsample=a.num_heads_upsample, dropout=a.dropout,
               learn_sigma=a.learn_sigma, use_scale_shift_norm=a.use_scale_shift_norm,
               out_channels=a.in_channels * (2 if a.learn_sigma else 1),
               diffusion_steps=a.diffusion_steps, noise_schedule=a.noise_schedule, sigma_small=a.sigma_small,
               use_kl=a.use_kl, predict_xstart=a.predict_xstart, rescale_timesteps=a.rescale_timesteps,
               rescale_learned_sigmas=a.rescale_learned_sigmas, timestep_respacing=a.timestep_respacing)
    if num_classes:
        cfg["num_classes"] = num_classes
    want = expected_names(cfg)
    missing = sorted(set(want) - set(sd))
    extra = sorted(set(sd) - set(want))
    if missing or extra:
        raise SystemExit(f"{a.input} ({source}) does not fit the flags: {len(missing)} missing "
                         f"(first {missing[:3]}), {len(extra)} unexpected (first {extra[:3]}). "
                         "Check --image_size/--num_channels/--num_res_blocks/--attention_resolutions/"
                         "--learn_sigma/--class_cond/--channel_mult.")
    tensors = {}
    for k, shape in want.items():
        v = sd[k].detach().cpu().float().numpy()
        if tuple(v.shape) != shape:
            raise SystemExit(f"{k}: shape {tuple(v.shape)} in the file, {shape} expected from the flags")
        tensors["model." + k] = v.astype("<f4")
        tensors["ema_0.9999." + k] = tensors["model." + k]
    meta = {"format": "iddpm-ckpt-1", "step": str(a.step), "config": json.dumps(cfg),
            "ema_rates": json.dumps([0.9999]), "opt_step": "0", "source": f"{source} {a.input}"}
    write_safetensors(a.output, tensors, meta)
    print(f"wrote {a.output}: {len(want)} parameters ({sum(int(np.prod(s)) for s in want.values())} values) "
          f"from {source}; config {json.dumps(cfg)}")


if __name__ == "__main__":
    main()
