/* gif.c — animated GIF writing with giflib 5 (e.g. the denoising chain of a sample).
 * Gray frames use an exact 256-level gray palette; RGB frames are quantized to a fixed
 * 6x7x6 colour cube (252 colours, more levels for green, to which the eye is most
 * sensitive). One global palette, a Graphics Control Extension per frame for the delay,
 * and the NETSCAPE2.0 application extension with loop count 0 (= forever). Output goes
 * through the atomic writer (tmp + rename). */
#include "io_internal.h"

#include <gif_lib.h>
#include <stdlib.h>
#include <string.h>

static int gif_out(GifFileType *g, const GifByteType *buf, int n) {
    io_atomic *a = g->UserData;
    return fwrite(buf, 1, (size_t)n, a->fp) == (size_t)n ? n : 0;
}

static int cube_index(const uint8_t *px) {
    int r = (px[0] * 5 + 127) / 255, g = (px[1] * 6 + 127) / 255, b = (px[2] * 5 + 127) / 255;
    return r * 42 + g * 6 + b;
}

idd_status idd_gif_write(const char *path, const uint8_t *frames, int t, int h, int w, int c,
                         int delay_cs) {
    if (t <= 0 || h <= 0 || w <= 0 || h > 65535 || w > 65535)
        return idd_error("%s: gif: bad size %d frames of %dx%d", path, t, h, w);
    if (c != 1 && c != 3) return idd_error("%s: gif: channels must be 1 or 3, got %d", path, c);
    if (!frames) return idd_error("%s: gif: frame data is NULL", path);
    if (delay_cs < 0 || delay_cs > 65535) return idd_error("%s: gif: delay %d out of range", path, delay_cs);
    ColorMapObject *cmap = GifMakeMapObject(256, NULL);
    GifByteType *line = malloc((size_t)w);
    if (!cmap || !line) {
        GifFreeMapObject(cmap);
        free(line);
        return idd_error_status(IDD_ENOMEM, "%s: gif: out of memory", path);
    }
    for (int i = 0; i < 256; i++) {
        GifColorType *col = &cmap->Colors[i];
        if (c == 1) {
            col->Red = col->Green = col->Blue = (GifByteType)i;
        } else if (i < 252) {
            col->Red = (GifByteType)((i / 42) * 255 / 5);
            col->Green = (GifByteType)(((i / 6) % 7) * 255 / 6);
            col->Blue = (GifByteType)((i % 6) * 255 / 5);
        } else {
            col->Red = col->Green = col->Blue = 0;
        }
    }
    io_atomic a;
    idd_status st = io_atomic_open(&a, path, "gif");
    if (st) {
        GifFreeMapObject(cmap);
        free(line);
        return st;
    }
    int gerr = 0;
    GifFileType *g = EGifOpen(&a, gif_out, &gerr);
    if (!g) {
        GifFreeMapObject(cmap);
        free(line);
        io_atomic_abort(&a);
        return idd_error_status(IDD_EIO, "%s: gif: %s", path, GifErrorString(gerr));
    }
    EGifSetGifVersion(g, true);
    int ok = EGifPutScreenDesc(g, w, h, 8, 0, cmap) == GIF_OK;
    /* loop forever: NETSCAPE2.0, sub-block {1, loop count lo, hi} */
    static const unsigned char loop[3] = {1, 0, 0};
    ok = ok && EGifPutExtensionLeader(g, APPLICATION_EXT_FUNC_CODE) == GIF_OK;
    ok = ok && EGifPutExtensionBlock(g, 11, "NETSCAPE2.0") == GIF_OK;
    ok = ok && EGifPutExtensionBlock(g, 3, loop) == GIF_OK;
    ok = ok && EGifPutExtensionTrailer(g) == GIF_OK;
    size_t frame_px = (size_t)h * (size_t)w;
    for (int f = 0; f < t && ok; f++) {
        GraphicsControlBlock gcb;
        memset(&gcb, 0, sizeof gcb);
        gcb.DisposalMode = DISPOSE_DO_NOT;
        gcb.DelayTime = delay_cs;
        gcb.TransparentColor = NO_TRANSPARENT_COLOR;
        GifByteType ext[4];
        size_t elen = EGifGCBToExtension(&gcb, ext);
        ok = EGifPutExtension(g, GRAPHICS_EXT_FUNC_CODE, (int)elen, ext) == GIF_OK;
        ok = ok && EGifPutImageDesc(g, 0, 0, w, h, false, NULL) == GIF_OK;
        const uint8_t *fr = frames + (size_t)f * frame_px * (size_t)c;
        for (int y = 0; y < h && ok; y++) {
            const uint8_t *row = fr + (size_t)y * (size_t)w * (size_t)c;
            for (int x = 0; x < w; x++) line[x] = c == 1 ? row[x] : (GifByteType)cube_index(row + 3 * x);
            ok = EGifPutLine(g, line, w) == GIF_OK;
        }
    }
    int why = g->Error;
    int cerr = 0;
    int closed = EGifCloseFile(g, &cerr) == GIF_OK;
    GifFreeMapObject(cmap);
    free(line);
    if (!ok || !closed) {
        io_atomic_abort(&a);
        return idd_error_status(IDD_EIO, "%s: gif: %s", path, GifErrorString(!ok ? why : cerr));
    }
    return io_atomic_commit(&a);
}
