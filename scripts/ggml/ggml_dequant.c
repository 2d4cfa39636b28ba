// Decodes blocks of any ggml type with ggml's own `to_float` (from the llama.cpp
// that scripts/build-llama-cpp.sh builds): the independent decoder for the types
// that PyPI's gguf-py does not know. Built and run by
// scripts/make-ggml-decode-vectors.sh.
#include <stdio.h>
#include <stdlib.h>
#include "ggml.h"
int main(int argc, char **argv) {
    if (argc != 5) { fprintf(stderr, "usage: TYPE_ID N_ELEMS IN OUT\n"); return 2; }
    int ty = atoi(argv[1]); long n = atol(argv[2]);
    size_t bytes = ggml_row_size(ty, n);
    FILE *f = fopen(argv[3], "rb"); void *src = malloc(bytes);
    if (!f || fread(src, 1, bytes, f) != bytes) { fprintf(stderr, "short read\n"); return 1; }
    fclose(f);
    float *dst = malloc(n * sizeof(float));
    const struct ggml_type_traits *t = ggml_get_type_traits(ty);
    if (!t->to_float) { fprintf(stderr, "no to_float for %s\n", t->type_name); return 1; }
    t->to_float(src, dst, n);
    f = fopen(argv[4], "wb"); fwrite(dst, sizeof(float), n, f); fclose(f);
    printf("%s %ld\n", t->type_name, n);
    return 0;
}
