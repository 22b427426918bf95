/* png.c — 8-bit PNG writing (gray, RGB, RGBA; optional tEXt chunk) with libpng's classic
 * API, and reading any PNG into 8-bit gray or RGB with libpng's simplified API, which
 * handles palette, 16-bit, gray<->RGB, tRNS/alpha and interlacing. libpng reports errors
 * by longjmp; that stays inside this file (setjmp in idd_png_write, and inside libpng's
 * simplified API), callers only see an idd_status. */
#include "io_internal.h"

#include <png.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    char msg[256];
} png_errbuf;

static void on_error(png_structp png, png_const_charp msg) {
    png_errbuf *e = png_get_error_ptr(png);
    if (e) snprintf(e->msg, sizeof e->msg, "%s", msg);
    png_longjmp(png, 1);
}

static void on_warning(png_structp png, png_const_charp msg) {
    (void)png;
    (void)msg;
}

idd_status idd_png_write(const char *path, const uint8_t *hwc, int h, int w, int c,
                         const char *text_key, const char *text) {
    if (h <= 0 || w <= 0 || h > 1000000 || w > 1000000)
        return idd_error("%s: png: bad image size %dx%d", path, h, w);
    if (c != 1 && c != 3 && c != 4) return idd_error("%s: png: channels must be 1, 3 or 4, got %d", path, c);
    if (!hwc) return idd_error("%s: png: pixel data is NULL", path);
    if ((text_key == NULL) != (text == NULL)) return idd_error("%s: png: text_key and text go together", path);
    if (text_key && (strlen(text_key) < 1 || strlen(text_key) > 79))
        return idd_error("%s: png: text key must be 1..79 characters", path);
    io_atomic a;
    idd_status st = io_atomic_open(&a, path, "png");
    if (st) return st;
    png_errbuf err = {{0}};
    png_structp png = png_create_write_struct(PNG_LIBPNG_VER_STRING, &err, on_error, on_warning);
    png_infop info = png ? png_create_info_struct(png) : NULL;
    if (!png || !info) {
        png_destroy_write_struct(&png, &info);
        io_atomic_abort(&a);
        return idd_error_status(IDD_ENOMEM, "%s: png: out of memory", path);
    }
    if (setjmp(png_jmpbuf(png))) {
        png_destroy_write_struct(&png, &info);
        io_atomic_abort(&a);
        return idd_error_status(IDD_EIO, "%s: png: %s", path, err.msg[0] ? err.msg : "libpng error");
    }
    png_init_io(png, a.fp);
    int color = c == 1 ? PNG_COLOR_TYPE_GRAY : c == 3 ? PNG_COLOR_TYPE_RGB : PNG_COLOR_TYPE_RGB_ALPHA;
    png_set_IHDR(png, info, (png_uint_32)w, (png_uint_32)h, 8, color, PNG_INTERLACE_NONE,
                 PNG_COMPRESSION_TYPE_DEFAULT, PNG_FILTER_TYPE_DEFAULT);
    if (text_key) {
        png_text t;
        memset(&t, 0, sizeof t);
        t.compression = PNG_TEXT_COMPRESSION_NONE;
        t.key = (png_charp)text_key;
        t.text = (png_charp)text;
        t.text_length = strlen(text);
        png_set_text(png, info, &t, 1);
    }
    png_write_info(png, info);
    for (int y = 0; y < h; y++) png_write_row(png, hwc + (size_t)y * (size_t)w * (size_t)c);
    png_write_end(png, NULL);
    png_destroy_write_struct(&png, &info);
    return io_atomic_commit(&a);
}

idd_status idd_png_read(const char *path, int want_c, uint8_t **data, int *h, int *w, int *c) {
    *data = NULL;
    *h = *w = *c = 0;
    if (want_c != 0 && want_c != 1 && want_c != 3)
        return idd_error("%s: png: want_c must be 0, 1 or 3, got %d", path, want_c);
    png_image img;
    memset(&img, 0, sizeof img);
    img.version = PNG_IMAGE_VERSION;
    FILE *fp = io_fopen_regular(path, "png");   /* a FIFO is refused, never blocked on */
    if (!fp) return IDD_EIO;
    if (!png_image_begin_read_from_stdio(&img, fp)) {
        idd_status st = idd_error_status(IDD_EIO, "%s: png: %s", path, img.message);
        png_image_free(&img);
        fclose(fp);
        return st;
    }
    int cc = want_c ? want_c : ((img.format & PNG_FORMAT_FLAG_COLOR) ? 3 : 1);
    img.format = cc == 1 ? PNG_FORMAT_GRAY : PNG_FORMAT_RGB;
    uint64_t bytes = (uint64_t)img.width * img.height * (uint64_t)cc;
    if (img.width == 0 || img.height == 0 || img.width > 1000000 || img.height > 1000000 ||
        bytes > ((uint64_t)1 << 31)) {
        idd_status st = idd_error("%s: png: image size %ux%u is not supported", path, img.height, img.width);
        png_image_free(&img);
        fclose(fp);
        return st;
    }
    uint8_t *buf = malloc((size_t)bytes);
    if (!buf) {
        png_image_free(&img);
        fclose(fp);
        return idd_error_status(IDD_ENOMEM, "%s: png: out of memory", path);
    }
    png_color bg = {0, 0, 0};
    if (!png_image_finish_read(&img, &bg, buf, 0, NULL)) {
        idd_status st = idd_error("%s: png: %s", path, img.message);
        png_image_free(&img);
        fclose(fp);
        free(buf);
        return st;
    }
    *data = buf;
    *h = (int)img.height;
    *w = (int)img.width;
    *c = cc;
    png_image_free(&img);
    fclose(fp);
    return IDD_OK;
}
