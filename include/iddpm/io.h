/* iddpm/io.h — file formats on raw host buffers: JSON, safetensors, PNG, .npy/.npz,
 * animated GIF, and the dataset formats (IDX for MNIST/Fashion-MNIST, CIFAR-10 binary).
 *
 * Nothing here knows about tensors or Lua: data goes in and comes out as plain
 * little-endian, C-order (row-major) host buffers described by idd_array.
 *
 * Errors: every function returns idd_status (IDD_OK == 0). On failure the thread-local
 * message (idd_last_error()) names the file and what is wrong, e.g.
 *   "unet.safetensors: tensor 'x' data_offsets [0, 12] do not match shape (2,3) F32 (24 bytes)"
 * I/O failures (open, read, write, rename) return IDD_EIO, malformed content IDD_ERR,
 * allocation failure IDD_ENOMEM. Nothing aborts, nothing longjmps out of these calls
 * (libpng's setjmp is contained inside png.c), nothing leaks on an error path, and every
 * *out argument is left NULL/empty on failure.
 *
 * Ownership: every pointer returned through an out-argument is heap memory owned by the
 * caller and released with the matching free function named next to it. The data of an
 * idd_array is always a separate malloc() block, so a caller may take it over (copy the
 * pointer, set a->data = NULL, later free() it) before freeing the container.
 *
 * Writers (safetensors, npy, npz, png, gif) write to "<path>.tmp.<pid>.<k>", created
 * exclusively next to <path> (O_EXCL|O_NOFOLLOW: an existing file or symbolic link of
 * that name is never written through), check every write, flush and close, fsync, then
 * rename() into place: a crash or an error never leaves a half-written file at <path>,
 * and on error the temp file is removed and an existing <path> is untouched.
 * Readers open only regular files (a FIFO or device is refused, never blocked on).
 *
 * Assumes a little-endian host (x86-64, aarch64). */
#ifndef IDDPM_IO_H
#define IDDPM_IO_H

#include <stddef.h>
#include <stdint.h>

#include "iddpm/core.h"
#include "iddpm/tensor.h"

/* ---------------------------------------------------------------------------------- */
/* A named, contiguous, C-order host array. Used by safetensors, npy/npz and datasets. */
typedef struct {
    char *name;                    /* NUL-terminated; may be NULL for unnamed arrays */
    idd_dtype dtype;               /* IDD_F32, IDD_F64, IDD_I64 or IDD_U8 */
    int ndim;                      /* 0..IDD_MAX_DIMS (0 = scalar, 1 element) */
    int64_t shape[IDD_MAX_DIMS];   /* outermost first */
    void *data;                    /* malloc'd, nbytes long (NULL allowed when nbytes == 0) */
    size_t nbytes;                 /* = prod(shape) * idd_dtype_size(dtype) */
} idd_array;

/* Write len bytes to path atomically, as the writers above do (what labels errors). */
idd_status idd_write_file_atomic(const char *path, const void *data, size_t len, const char *what);

/* Free name and data of one array (not the struct itself) and zero it. NULL is fine. */
void idd_array_clear(idd_array *a);
/* Element count prod(shape) (1 for ndim 0). */
int64_t idd_array_numel(const idd_array *a);
/* Shapes print with idd_shape_str_n() from tensor.h. */

/* A string -> string map (safetensors __metadata__). Keys are unique. */
typedef struct {
    size_t n;
    char **keys;    /* each malloc'd, NUL-terminated */
    char **values;  /* each malloc'd, NUL-terminated */
} idd_strmap;

/* Insert or replace key (both strings are copied). */
idd_status idd_strmap_set(idd_strmap *m, const char *key, const char *value);
/* append a key known to be new (no search; takes ownership of value, a malloc'd string) */
idd_status idd_strmap_append(idd_strmap *m, const char *key, char *value);
/* NULL if absent. The pointer lives as long as the map. */
const char *idd_strmap_get(const idd_strmap *m, const char *key);
/* Free all keys/values and zero the map (the struct itself is the caller's). */
void idd_strmap_clear(idd_strmap *m);

/* ---------------------------------------------------------------------------------- */
/* JSON (engine/io/json.c). RFC 8259 values; nesting depth limited to IDD_JSON_MAX_DEPTH;
 * duplicate object keys are an error; strings are UTF-8 with \uXXXX (and surrogate pairs)
 * decoded; \u0000 is rejected so every string is a plain C string. */
#define IDD_JSON_MAX_DEPTH 64

typedef enum {
    IDD_JSON_NULL, IDD_JSON_BOOL, IDD_JSON_NUMBER, IDD_JSON_STRING, IDD_JSON_ARRAY,
    IDD_JSON_OBJECT
} idd_json_type;

typedef struct idd_json {
    idd_json_type type;
    int boolean;             /* BOOL */
    double number;           /* NUMBER */
    int is_int;              /* NUMBER written as an integer literal that fits int64 */
    int64_t integer;         /* valid when is_int */
    char *str;               /* STRING, NUL-terminated */
    size_t n;                /* ARRAY / OBJECT: number of items */
    struct idd_json *items;  /* ARRAY elements / OBJECT values (n of them) */
    char **keys;             /* OBJECT keys (n of them), in file order */
} idd_json;

/* Parse text[0..len) (need not be NUL-terminated). *out is malloc'd: idd_json_free().
 * Errors say where: "json: line 1, column 17: expected ',' or '}' in object". */
idd_status idd_json_parse(const char *text, size_t len, idd_json **out);
/* Free a value returned by idd_json_parse or idd_json_new_* (recursively). NULL ok. */
void idd_json_free(idd_json *v);
/* Object member by key, or NULL (also NULL when obj is not an object). */
const idd_json *idd_json_get(const idd_json *obj, const char *key);
/* Serialize compactly into a malloc'd NUL-terminated string (*out, length *len; len may
 * be NULL). Integers are written exactly, other numbers with %.17g; NaN/Inf are an
 * error. Free *out with free(). */
idd_status idd_json_write(const idd_json *v, char **out, size_t *len);
/* Builders for writing: each returns a heap value (NULL on out-of-memory). append/set
 * take ownership of item (even on failure, when they free it). set replaces an existing
 * key. */
idd_json *idd_json_new_null(void);
idd_json *idd_json_new_bool(int b);
idd_json *idd_json_new_number(double x);
idd_json *idd_json_new_int(int64_t x);
idd_json *idd_json_new_string(const char *s);
idd_json *idd_json_new_array(void);
idd_json *idd_json_new_object(void);
idd_status idd_json_append(idd_json *arr, idd_json *item);
idd_status idd_json_set(idd_json *obj, const char *key, idd_json *item);

/* ---------------------------------------------------------------------------------- */
/* safetensors (engine/io/safetensors.c), the huggingface format:
 *   u64 LE header length N | N bytes JSON header | data buffer.
 * Reader: validates N against the file size (and <= 100,000,000), the JSON, every entry
 * (known dtype, shape, data_offsets inside the buffer and == prod(shape)*dtype size),
 * that entries neither overlap nor leave gaps and the buffer ends at the file end (the
 * rules of the reference implementation), no duplicate names, and that __metadata__ is
 * a string->string map. Stored dtypes F32, F64, I64, U8 load as is; F16 and BF16 are
 * converted to F32, I32 to I64, BOOL to U8. Entries keep the file's header order. */
typedef struct {
    char *path;          /* as given */
    size_t n;            /* number of tensors */
    idd_array *tensors;  /* n entries; names unique; each data its own malloc block */
    idd_strmap meta;     /* __metadata__ (empty if absent) */
} idd_st_file;

/* Read a whole file. *out: idd_st_free(). */
idd_status idd_st_read(const char *path, idd_st_file **out);
/* Tensor by name, or NULL. */
const idd_array *idd_st_find(const idd_st_file *f, const char *name);
void idd_st_free(idd_st_file *f);
/* Write tensors[0..n) (dtype F32/F64/I64/U8/BF16 (stored as BF16); names non-empty, unique, not
 * "__metadata__"; data may be NULL only if nbytes == 0; nbytes must equal
 * prod(shape)*dtype size) and meta (may be NULL) to path, atomically (tmp + fsync +
 * rename). Layout as the reference serializer: entries ordered by dtype size descending,
 * then by name, packed with no gaps, header space-padded to a multiple of 8, so every
 * tensor's data is aligned to its element size. The caller's arrays are not modified. */
idd_status idd_st_write(const char *path, const idd_array *tensors, size_t n,
                        const idd_strmap *meta);

/* ---------------------------------------------------------------------------------- */
/* PNG (engine/io/png.c), 8-bit, HWC interleaved, row-major, top row first. */

/* Write h x w x c (c = 1 gray, 3 RGB, 4 RGBA) pixels. text_key/text (both NULL or both
 * set) add one tEXt chunk, e.g. key "parameters" with the sampling settings. */
idd_status idd_png_write(const char *path, const uint8_t *hwc, int h, int w, int c,
                         const char *text_key, const char *text);
/* Read any PNG (palette, gray, 16-bit, alpha, interlaced) into 8-bit HWC. want_c: 1 =
 * gray, 3 = RGB, 0 = 1 if the file is gray(+alpha), else 3. Alpha is composited onto
 * black. 16-bit and gray<->RGB conversions are libpng's (sRGB-aware). *data: free(). */
idd_status idd_png_read(const char *path, int want_c, uint8_t **data, int *h, int *w,
                        int *c);

/* ---------------------------------------------------------------------------------- */
/* NumPy .npy / .npz (engine/io/npz.c).
 * Read: .npy versions 1.0/2.0/3.0, C order, descr little-endian or byte-sized:
 *   f2 f4 -> F32, f8 -> F64, i1 i2 i4 i8 u2 u4 -> I64 (u8 only if it fits), u1 b1 -> U8.
 * Fortran order and big-endian data are rejected with a clear message.
 * .npz: a ZIP of <name>.npy members, stored or deflated (savez_compressed), zip64 ok;
 * CRC-32 is checked. Array names are the member names without ".npy".
 * Write: .npy v1.0 (v2.0 if the header needs it), descr <f4 <f8 <i8 |u1, data aligned to
 * 64 bytes; .npz uncompressed (STORED), what np.savez writes, members < 4 GiB each.
 * numpy has no bfloat16: a BF16 array is refused (the Lua io.npz_write converts it to
 * float32 first, exactly). */
idd_status idd_npy_read(const char *path, idd_array *out);   /* out: idd_array_clear() */
idd_status idd_npy_write(const char *path, const idd_array *a);

typedef struct {
    size_t n;
    idd_array *arrays;   /* names without ".npy", in archive order */
} idd_npz;

idd_status idd_npz_read(const char *path, idd_npz **out);    /* *out: idd_npz_free() */
const idd_array *idd_npz_find(const idd_npz *z, const char *name);
void idd_npz_free(idd_npz *z);
/* Write arrays[0..n) (each must have a name: "arr_0", "arr_1", ...) to path. */
idd_status idd_npz_write(const char *path, const idd_array *arrays, size_t n);

/* ---------------------------------------------------------------------------------- */
/* Animated GIF (engine/io/gif.c). frames: t x h x w x c uint8 (c = 1 gray or 3 RGB).
 * Gray uses a 256-level gray palette (exact); RGB is quantized to a fixed 6x7x6 colour
 * cube (252 colours) with nearest-level rounding. delay_cs: frame delay in 1/100 s.
 * Loops forever (NETSCAPE2.0). */
idd_status idd_gif_write(const char *path, const uint8_t *frames, int t, int h, int w,
                         int c, int delay_cs);

/* ---------------------------------------------------------------------------------- */
/* Datasets (engine/io/datasets.c). */

/* IDX file (LeCun's MNIST format), gzip-compressed or raw (zlib's gzopen reads both).
 * Type 0x08 (ubyte) -> U8, 0x09 (sbyte), 0x0B (short), 0x0C (int) -> I64, 0x0D (float)
 * -> F32, 0x0E (double) -> F64. Shape = the file's dims, e.g. (60000,28,28) or (60000). */
idd_status idd_idx_read(const char *path, idd_array *out);   /* out: idd_array_clear() */
/* MNIST / Fashion-MNIST pair: images U8 (N,H,W), labels I64 (N); checks the counts agree
 * and labels are 0..9. */
idd_status idd_mnist_read(const char *images_path, const char *labels_path,
                          idd_array *images, idd_array *labels);
/* CIFAR-10 binary batch (data_batch_1..5.bin, test_batch.bin): records of 1 label byte
 * + 3072 pixel bytes (R plane, G plane, B plane, each 32x32 row-major). images: U8
 * (N,3,32,32) CHW as stored; labels: I64 (N), checked to be 0..9. */
idd_status idd_cifar10_read(const char *path, idd_array *images, idd_array *labels);

/* ---------------------------------------------------------------------------------- */
/* Batch loader (engine/io/loader.c). Holds a copy of a uint8 dataset (N,C,H,W) and its
 * labels, and assembles float32 batches scaled to [-1,1] (v/127.5 - 1, the official
 * rule) in a background pthread: while the caller trains on batch k, batch k+1 is
 * being built, so the model never waits for data.
 *
 * Order: epoch e visits the samples in a permutation drawn by Fisher-Yates from the
 * Philox stream (seed, stream) at counters (e << 32) + i; batches are consecutive slices
 * of it, the last incomplete slice is dropped (drop_last, as the official loader). A
 * random horizontal flip (opts.flip) is one Philox bit per (epoch, slot) from stream
 * + 1. So the whole order is a function of (seed, stream, epoch, index): the position
 * (epoch, index = samples already taken in this epoch) is the complete loader state,
 * and restoring it resumes bit for bit. */
typedef struct idd_loader idd_loader;
typedef struct {
    int64_t batch_size;   /* >= 1 and <= N */
    int shuffle;          /* 0: dataset order every epoch */
    int flip;             /* random horizontal flips */
    uint64_t seed, stream;
    /* data parallelism: world_size ranks (0 or 1: one) share each epoch's permutation;
     * a step takes world_size*batch_size consecutive slots and rank r the r-th slice of
     * them, so together the ranks read what one loader with batch world_size*batch_size
     * reads (flips included). The position is global: the same on every rank. */
    int64_t rank, world_size;
} idd_loader_opts;

/* images: n*c*h*w bytes (copied); labels: n values or NULL (copied). */
idd_status idd_loader_new(const uint8_t *images, int64_t n, int c, int h, int w, const int64_t *labels,
                          const idd_loader_opts *opts, idd_loader **out);
/* Fill x (batch_size*c*h*w floats) and y (batch_size labels, -1 without labels) with
 * the batch at the current position, then advance it. */
idd_status idd_loader_next(idd_loader *l, float *x, int64_t *y);
void idd_loader_position(idd_loader *l, int64_t *epoch, int64_t *index);
/* index must be a multiple of batch_size with index + batch_size <= N; sharded
 * (world_size > 1): any index <= N, and a position without room for a global batch
 * moves to the start of the next epoch (a resume with another world size) */
idd_status idd_loader_set_position(idd_loader *l, int64_t epoch, int64_t index);
void idd_loader_free(idd_loader *l);   /* joins the thread; NULL is fine */

/* Centre-crop h x w x c (HWC) to its largest central square, then resize to size x size
 * (area average when shrinking, bilinear when enlarging); writes c x size x size (CHW). */
idd_status idd_resize_center_crop(const uint8_t *hwc, int h, int w, int c, int size, uint8_t *chw);

#endif
