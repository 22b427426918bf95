/* json_mini.h — a small JSON reader for the tests: parse a file into a tree, then look
 * values up by a dotted path ("ops.cosine_small_hybrid.cases.t_edge.f64.q_sample").
 * Object keys may themselves contain dots (the golden file's "shapes" table does):
 * lookup tries every key that is a prefix of the remaining path at a dot boundary. */
#ifndef IDDPM_JSON_MINI_H
#define IDDPM_JSON_MINI_H
#include <stddef.h>

typedef enum { JSON_NULL, JSON_BOOL, JSON_NUM, JSON_STR, JSON_ARR, JSON_OBJ } json_type;

typedef struct json_value {
    json_type type;
    double num;                 /* JSON_NUM, JSON_BOOL (0/1) */
    char *str;                  /* JSON_STR */
    size_t n;                   /* JSON_ARR, JSON_OBJ: number of items */
    char **keys;                /* JSON_OBJ */
    struct json_value **items;  /* JSON_ARR, JSON_OBJ */
} json_value;

/* NULL on failure, with a message in err */
json_value *json_parse_file(const char *path, char *err, size_t errlen);
json_value *json_parse(const char *text, size_t len, char *err, size_t errlen);
void json_free(json_value *v);
const json_value *json_get(const json_value *root, const char *path);
/* Numbers under path, nested arrays flattened row-major, a lone number as 1 element.
 * malloc'd (free it); NULL if absent or not numeric. */
double *json_get_doubles(const json_value *root, const char *path, long *n);
#endif
