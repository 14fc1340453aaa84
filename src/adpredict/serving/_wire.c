/* PredictRequest wire bytes -> the codec's arrays in one pass (adpredict.serving._wire).
 *
 * Why: in a K = 300 request nearly all the decode time went to objects made and dropped on the
 * way: upb's parse, a Python list per column (`values[:]`, one bytes object per value), and
 * then the numpy object array built from that list. Here the values go from the wire bytes
 * straight into the arrays RequestCodec.decode returns, and a value seen before (up to 32 bytes)
 * is the same bytes object again (the plan's cache, below): fewer objects made and freed per
 * request, and fewer distinct strings for TensorFlow to copy from.
 *
 * This is a fast path only, like _scan.c: it answers for requests in the usual shape that
 * certainly pass the codec's checks, and returns None for anything else, which then takes the
 * full path (upb parse + RequestCodec's Python checks, which name the offending field). "The
 * usual shape" is what every protobuf serializer writes for a valid request: the known fields
 * only, each singular field at most once, map entries with exactly a key and a value, each map
 * key once, counts packed in one run, ASCII map keys, UTF-8 strings. Duplicates, unknown
 * fields, unpacked counts and the like are legal protobuf that upb resolves (last one wins,
 * skipped, ...); they go to the full path rather than be reimplemented here.
 *
 * header(data) -> (request_id, model, num_candidates) or None
 *   Walks the whole message (nested messages included) and checks it is in the usual shape;
 *   None if not (or if it is not valid protobuf at all). When this passes, upb parses the same
 *   bytes to a message with these three fields and the same map contents.
 *
 * Plan(context, candidates, max_value_bytes[, rows]) -> a plan, built once per codec
 *   context / candidates: sequences of (name: bytes, kind: int, max_values: int, absent) with
 *   kind 0 categorical, 1 multi_categorical, 2 numeric, and `absent` the read-only array a
 *   context field gets when it is missing (None for candidate fields).
 *   rows: one (buckets, offset, boundaries) per field, context then candidates (the model's
 *   table layout, features.py): a rows plan, see decode.
 *
 * decode(data, plan, k) -> (context: dict, candidates: dict, missing: int) or None
 *   For bytes that passed header() with num_candidates == k. The arrays are exactly what
 *   RequestCodec.decode returns for the parsed message; None when any check might fail (or
 *   the numbers are not short plain decimals, see safe_decimal): the full path decides.
 *   With a rows plan, after the same checks, each value becomes its row in the model's table
 *   instead of a bytes object (RequestCodec's rows layout: int64 [n] per single-valued field,
 *   (rows int64, weights float32) [n, widest + 1] per multi-valued one), hashed as the graph
 *   hashes: FarmHash Fingerprint64 (_farmhash.h, TensorFlow's to_hash_bucket_fast) for
 *   categorical values, strtof + upper_bound in float32 for numeric ones.
 *
 * field_rows(plan, index, values): the same rows for one field's values decoded elsewhere
 *   (the codec's fallback: upb + the Python checks), through the same code.
 *
 * fingerprint64(data), numeric_bucket(value, boundaries): the two hashes for one value, for
 *   the tests that check them against TensorFlow.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <float.h>
#include <locale.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#include <numpy/arrayobject.h>

#include "_farmhash.h"
#include "_values.h"

enum { WT_VARINT = 0, WT_LEN = 2 };
enum { KIND_CATEGORICAL = 0, KIND_MULTI = 1, KIND_NUMERIC = 2 };
/* PredictRequest fields */
enum { F_REQUEST_ID = 1, F_MODEL = 2, F_CONTEXT = 3, F_NUM_CANDIDATES = 4, F_CANDIDATES = 5 };

typedef struct {
    const uint8_t *p, *end;
} Reader;

typedef struct {
    const char *ptr;
    Py_ssize_t len;
} Span;

/* A varint of at most 10 bytes and 64 bits; 0 if truncated or longer. */
static int read_varint_slow(Reader *r, uint64_t *out) {
    uint64_t value = 0;
    for (int shift = 0; shift < 70; shift += 7) {
        if (r->p >= r->end) {
            return 0;
        }
        uint8_t byte = *r->p++;
        if (shift == 63 && byte > 1) { /* more than 64 bits */
            return 0;
        }
        value |= (uint64_t)(byte & 0x7f) << shift;
        if (!(byte & 0x80)) {
            *out = value;
            return 1;
        }
    }
    return 0;
}

/* Inlined one-byte case first: tags, value lengths and counts are nearly all one byte, and a
 * K = 300 request reads ~14k of them (header() and decode() each walk the message). */
static inline __attribute__((always_inline)) int read_varint(Reader *r, uint64_t *out) {
    if (r->p < r->end && *r->p < 0x80) {
        *out = *r->p++;
        return 1;
    }
    return read_varint_slow(r, out);
}

/* A tag: field number and wire type; 0 at the end of the input or if malformed, and then
 * r is left where the tag began (so a caller's "r->p == r->end" tells the two apart). */
static int read_tag_slow(Reader *r, uint32_t *field, uint32_t *wire_type) {
    const uint8_t *start = r->p;
    uint64_t tag;
    if (r->p >= r->end || !read_varint(r, &tag) || r->p - start > 5 || tag > UINT32_MAX ||
        (tag >> 3) == 0) { /* upb refuses tags longer than 5 bytes */
        r->p = start;
        return 0;
    }
    *field = (uint32_t)(tag >> 3);
    *wire_type = (uint32_t)(tag & 7);
    return 1;
}

static inline __attribute__((always_inline)) int read_tag(Reader *r, uint32_t *field,
                                                          uint32_t *wire_type) {
    if (r->p < r->end && *r->p < 0x80 && (*r->p >> 3) != 0) { /* one byte: fields 1-15 */
        *field = *r->p >> 3;
        *wire_type = *r->p & 7;
        r->p++;
        return 1;
    }
    return read_tag_slow(r, field, wire_type);
}

/* The payload of a length-delimited field; 0 if it runs past the end. */
static int read_len(Reader *r, Reader *inner) {
    uint64_t len;
    if (!read_varint(r, &len) || len > (uint64_t)(r->end - r->p)) {
        return 0;
    }
    inner->p = r->p;
    inner->end = r->p + len;
    r->p += len;
    return 1;
}

/* Walks a map entry {1: key, 2: value}: exactly one of each, in either order. */
static int read_entry(Reader entry, Reader *key, Reader *value) {
    int have_key = 0, have_value = 0;
    uint32_t field, wire_type;
    while (read_tag(&entry, &field, &wire_type)) {
        if (wire_type != WT_LEN) {
            return 0;
        }
        if (field == 1 && !have_key) {
            have_key = 1;
            if (!read_len(&entry, key)) {
                return 0;
            }
        } else if (field == 2 && !have_value) {
            have_value = 1;
            if (!read_len(&entry, value)) {
                return 0;
            }
        } else {
            return 0;
        }
    }
    return entry.p == entry.end && have_key && have_value;
}

/* Whether a Values (column = 0) or Column (column = 1) message is in the usual shape:
 * repeated bytes values = 1; (Column) repeated uint32 counts = 2, packed, in one run. */
static int usual_values(Reader msg, int column) {
    int have_counts = 0;
    uint32_t field, wire_type;
    Reader inner;
    while (read_tag(&msg, &field, &wire_type)) {
        if (wire_type != WT_LEN || !read_len(&msg, &inner)) {
            return 0;
        }
        if (field == 1) {
            continue;
        }
        if (field != 2 || !column || have_counts) {
            return 0;
        }
        have_counts = 1;
        uint64_t count;
        while (inner.p < inner.end) {
            if (!read_varint(&inner, &count) || count > UINT32_MAX) {
                return 0;
            }
        }
    }
    return msg.p == msg.end;
}

static int ascii(Reader s) {
    for (; s.p < s.end; s.p++) {
        if (*s.p >= 0x80) {
            return 0;
        }
    }
    return 1;
}

static PyObject *utf8(Reader s) {
    PyObject *text = PyUnicode_DecodeUTF8((const char *)s.p, s.end - s.p, "strict");
    if (text == NULL) {
        PyErr_Clear();
    }
    return text;
}

static PyObject *header(PyObject *self, PyObject *arg) {
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    Reader r = {view.buf, (const uint8_t *)view.buf + view.len};
    Reader request_id = {NULL, NULL}, model = {NULL, NULL}, inner, key, value;
    int seen_id = 0, seen_model = 0, seen_k = 0, usual = 1;
    uint64_t k = 0;
    uint32_t field, wire_type;
    while (usual && read_tag(&r, &field, &wire_type)) {
        if (field == F_NUM_CANDIDATES) {
            usual = wire_type == WT_VARINT && !seen_k++ && read_varint(&r, &k) && k <= UINT32_MAX;
        } else if (wire_type != WT_LEN || !read_len(&r, &inner)) {
            usual = 0;
        } else if (field == F_REQUEST_ID) {
            usual = !seen_id++;
            request_id = inner;
        } else if (field == F_MODEL) {
            usual = !seen_model++;
            model = inner;
        } else if (field == F_CONTEXT || field == F_CANDIDATES) {
            usual = read_entry(inner, &key, &value) && ascii(key) &&
                    usual_values(value, field == F_CANDIDATES);
        } else {
            usual = 0;
        }
    }
    PyObject *result = NULL;
    if (usual && r.p == r.end) {
        PyObject *id = utf8(request_id), *name = id ? utf8(model) : NULL;
        if (name != NULL) {
            result = Py_BuildValue("(NNK)", id, name, (unsigned long long)k);
        } else {
            Py_XDECREF(id);
        }
    }
    PyBuffer_Release(&view);
    if (result == NULL && !PyErr_Occurred()) {
        Py_RETURN_NONE;
    }
    return result;
}

/* ------------------------------------------------------------------------------ the plan */

typedef struct {
    PyObject *name;   /* bytes, the schema field name (also the dict key, as str) */
    PyObject *key;    /* str */
    int kind;
    Py_ssize_t max_values;
    PyObject *absent; /* context fields: the shared array for "missing" */
    /* rows plans only (see decode): the field's table range and numeric boundaries */
    int64_t buckets, offset;
    float *bounds;
    Py_ssize_t n_bounds;
} FieldPlan;

/* Value objects already made, direct-mapped by a hash of their bytes. Feature values repeat
 * (a few formats, sizes and advertisers make most of the traffic), so most values of a request
 * are found here instead of allocated, and one bytes object is shared by every request that
 * sends it. Only touched with the GIL held. */
#define CACHE_SLOTS 16384 /* a power of two */
#define CACHED_BYTES 32   /* longer values are always made afresh */

typedef struct {
    Py_ssize_t n_context, n_candidates, max_value_bytes;
    FieldPlan *fields; /* context fields, then candidate fields */
    PyObject **cache;  /* CACHE_SLOTS entries, each NULL or a bytes object */
    int rows;          /* decode to the model's table rows instead of bytes objects */
} Plan;

static const char *PLAN = "adpredict.serving._wire.Plan";

static void free_plan(PyObject *capsule) {
    Plan *plan = PyCapsule_GetPointer(capsule, PLAN);
    if (plan == NULL) {
        return;
    }
    for (Py_ssize_t i = 0; i < plan->n_context + plan->n_candidates; i++) {
        Py_XDECREF(plan->fields[i].name);
        Py_XDECREF(plan->fields[i].key);
        Py_XDECREF(plan->fields[i].absent);
        PyMem_Free(plan->fields[i].bounds);
    }
    for (Py_ssize_t i = 0; plan->cache != NULL && i < CACHE_SLOTS; i++) {
        Py_XDECREF(plan->cache[i]);
    }
    PyMem_Free(plan->cache);
    PyMem_Free(plan->fields);
    PyMem_Free(plan);
}

static int plan_fields(PyObject *seq, FieldPlan *out, Py_ssize_t n, int context) {
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(seq, i), *absent, *name;
        FieldPlan *f = &out[i];
        if (!PyArg_ParseTuple(item, "SinO:Plan field", &name, &f->kind, &f->max_values,
                              &absent)) {
            return 0;
        }
        if (f->kind < KIND_CATEGORICAL || f->kind > KIND_NUMERIC || f->max_values < 1 ||
            (context && !PyArray_Check(absent))) {
            PyErr_SetString(PyExc_ValueError, "Plan: bad field (kind, max_values or absent)");
            return 0;
        }
        f->key = PyUnicode_DecodeASCII(PyBytes_AS_STRING(name), PyBytes_GET_SIZE(name), "strict");
        if (f->key == NULL) {
            return 0;
        }
        f->name = Py_NewRef(name); /* owned only from here: free_plan releases what is set */
        f->absent = context ? absent : NULL;
        Py_XINCREF(f->absent);
    }
    return 1;
}

/* A sequence of numbers as a PyMem float32 array (*n items, at least one slot); NULL with an
 * error set if it is not one. */
static float *float_array(PyObject *seq, Py_ssize_t *n) {
    PyObject *fast = PySequence_Fast(seq, "boundaries must be a sequence of numbers");
    if (fast == NULL) {
        return NULL;
    }
    *n = PySequence_Fast_GET_SIZE(fast);
    float *out = PyMem_Malloc((size_t)(*n + 1) * sizeof(float));
    if (out == NULL) {
        PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; out != NULL && i < *n; i++) {
        double x = PyFloat_AsDouble(PySequence_Fast_GET_ITEM(fast, i));
        if (x == -1.0 && PyErr_Occurred()) {
            PyMem_Free(out);
            out = NULL;
        } else {
            out[i] = (float)x;
        }
    }
    Py_DECREF(fast);
    return out;
}

/* The rows configuration: one (buckets, offset, boundaries) per field, context then
 * candidates, as features.py lays out the model's table. */
static int plan_rows(PyObject *rows, Plan *plan) {
    Py_ssize_t n = plan->n_context + plan->n_candidates;
    PyObject *seq = PySequence_Fast(rows, "Plan: rows must be a sequence");
    if (seq == NULL) {
        return 0;
    }
    int ok = PySequence_Fast_GET_SIZE(seq) == n;
    if (!ok) {
        PyErr_SetString(PyExc_ValueError, "Plan: one rows entry per field");
    }
    for (Py_ssize_t i = 0; ok && i < n; i++) {
        FieldPlan *f = &plan->fields[i];
        PyObject *bounds;
        long long buckets, offset;
        ok = PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "LLO:Plan rows", &buckets,
                              &offset, &bounds);
        if (ok && (buckets < 2 || offset < 0)) {
            PyErr_SetString(PyExc_ValueError, "Plan: rows need buckets >= 2 and offset >= 0");
            ok = 0;
        }
        if (ok) {
            f->buckets = buckets;
            f->offset = offset;
            f->bounds = float_array(bounds, &f->n_bounds);
            ok = f->bounds != NULL;
        }
    }
    Py_DECREF(seq);
    plan->rows = ok;
    return ok;
}

static PyObject *make_plan(PyObject *self, PyObject *args) {
    PyObject *context, *candidates, *rows = Py_None;
    Py_ssize_t limit;
    if (!PyArg_ParseTuple(args, "OOn|O:Plan", &context, &candidates, &limit, &rows)) {
        return NULL;
    }
    PyObject *ctx = PySequence_Fast(context, "Plan: context must be a sequence");
    PyObject *cand = ctx ? PySequence_Fast(candidates, "Plan: candidates must be a sequence")
                         : NULL;
    Plan *plan = PyMem_Calloc(1, sizeof(Plan));
    PyObject *capsule = NULL;
    if (plan == NULL) {
        PyErr_NoMemory();
    }
    if (cand != NULL && plan != NULL) {
        plan->n_context = PySequence_Fast_GET_SIZE(ctx);
        plan->n_candidates = PySequence_Fast_GET_SIZE(cand);
        plan->max_value_bytes = limit;
        plan->fields = PyMem_Calloc(plan->n_context + plan->n_candidates + 1, sizeof(FieldPlan));
        plan->cache = PyMem_Calloc(CACHE_SLOTS, sizeof(PyObject *));
        if (plan->fields != NULL && plan->cache != NULL && plan_fields(ctx, plan->fields, plan->n_context, 1) &&
            plan_fields(cand, plan->fields + plan->n_context, plan->n_candidates, 0) &&
            (rows == Py_None || plan_rows(rows, plan))) {
            capsule = PyCapsule_New(plan, PLAN, free_plan);
        }
    }
    if (capsule == NULL && plan != NULL) {
        PyObject *tmp = PyCapsule_New(plan, PLAN, free_plan); /* frees what was filled in */
        Py_XDECREF(tmp);
        if (!PyErr_Occurred()) {
            PyErr_NoMemory();
        }
    }
    Py_XDECREF(ctx);
    Py_XDECREF(cand);
    return capsule;
}

/* ---------------------------------------------------------------------------- the decode */

/* Growable list of value spans and counts, reused within one decode call. */
typedef struct {
    Span *spans;
    Py_ssize_t n, cap;
    uint32_t *counts;
    Py_ssize_t n_counts, cap_counts;
} Scratch;

/* Room for one more item in a growable buffer of n items of `size` bytes (capacity *cap). */
static int reserve(void **buffer, Py_ssize_t n, Py_ssize_t *cap, size_t size) {
    if (n < *cap) {
        return 1;
    }
    Py_ssize_t grown_cap = *cap ? 2 * *cap : 512;
    void *grown = PyMem_Realloc(*buffer, grown_cap * size);
    if (grown == NULL) {
        return 0;
    }
    *buffer = grown;
    *cap = grown_cap;
    return 1;
}

static int push_span(Scratch *s, Reader v) {
    if (!reserve((void **)&s->spans, s->n, &s->cap, sizeof(Span))) {
        return 0;
    }
    s->spans[s->n].ptr = (const char *)v.p;
    s->spans[s->n++].len = v.end - v.p;
    return 1;
}

static int push_count(Scratch *s, uint32_t c) {
    if (!reserve((void **)&s->counts, s->n_counts, &s->cap_counts, sizeof(uint32_t))) {
        return 0;
    }
    s->counts[s->n_counts++] = c;
    return 1;
}

/* Collects a Values/Column message's values and counts (shape already checked by header). */
static int collect(Reader msg, Scratch *s) {
    s->n = s->n_counts = 0;
    uint32_t field, wire_type;
    Reader inner;
    while (read_tag(&msg, &field, &wire_type)) {
        if (wire_type != WT_LEN || !read_len(&msg, &inner)) {
            return 0;
        }
        if (field == 1) {
            if (!push_span(s, inner)) {
                return 0;
            }
        } else {
            uint64_t c;
            while (inner.p < inner.end) {
                if (!read_varint(&inner, &c) || !push_count(s, (uint32_t)c)) {
                    return 0;
                }
            }
        }
    }
    return 1;
}

/* Whether every span passes: length <= limit, empties only if allowed, numbers plain decimals.
 * *empty gets the number of empty spans. */
static int spans_pass(const Scratch *s, Py_ssize_t limit, int allow_empty, int numeric,
                      Py_ssize_t *empty) {
    *empty = 0;
    for (Py_ssize_t i = 0; i < s->n; i++) {
        Py_ssize_t len = s->spans[i].len;
        if (len == 0) {
            if (!allow_empty) {
                return 0;
            }
            ++*empty;
        } else if (len > limit || (numeric && !safe_decimal(s->spans[i].ptr, len))) {
            return 0;
        }
    }
    return 1;
}

/* A new object array of the given shape with every slot set to b"". */
static PyObject *empty_values(int ndim, npy_intp *dims, PyObject *blank) {
    PyObject *array = PyArray_SimpleNew(ndim, dims, NPY_OBJECT);
    if (array == NULL) {
        return NULL;
    }
    npy_intp size = PyArray_SIZE((PyArrayObject *)array);
    PyObject **slots = PyArray_DATA((PyArrayObject *)array);
    for (npy_intp i = 0; i < size; i++) {
        Py_INCREF(blank);
        slots[i] = blank;
    }
    return array;
}

/* A hash of span (at most CACHED_BYTES long) for the cache's slot index: one multiply per
 * eight bytes (FNV-1a, before, made one per byte). */
static inline uint64_t slot_of(Span span) {
    const uint64_t m = 0x9E3779B97F4A7C15ull;
    uint64_t h = (uint64_t)span.len * m;
    Py_ssize_t i = 0;
    for (; i + 8 <= span.len; i += 8) {
        uint64_t w;
        memcpy(&w, span.ptr + i, 8);
        h = (h ^ w) * m;
        h ^= h >> 29;
    }
    if (i < span.len) {
        uint64_t w = 0;
        for (int shift = 0; i < span.len; i++, shift += 8) {
            w |= (uint64_t)(uint8_t)span.ptr[i] << shift;
        }
        h = (h ^ w) * m;
    }
    h ^= h >> 32;
    return h * m >> 40;
}

/* The cache slot for span (NULL if span is too long to be cached). */
static inline PyObject **slot_for(PyObject **cache, Span span) {
    return span.len > CACHED_BYTES ? NULL : &cache[slot_of(span) & (CACHE_SLOTS - 1)];
}

/* A bytes object equal to span: the one in *slot if equal, else new (and then kept in *slot
 * unless slot is NULL). New reference. */
static PyObject *value_object(PyObject **slot, Span span) {
    if (slot == NULL) {
        return PyBytes_FromStringAndSize(span.ptr, span.len);
    }
    if (*slot != NULL && PyBytes_GET_SIZE(*slot) == span.len &&
        memcmp(PyBytes_AS_STRING(*slot), span.ptr, span.len) == 0) {
        return Py_NewRef(*slot);
    }
    PyObject *value = PyBytes_FromStringAndSize(span.ptr, span.len);
    if (value != NULL) {
        Py_XSETREF(*slot, Py_NewRef(value));
    }
    return value;
}

/* Sets slots[i] (holding a reference to blank) to a bytes object for span i.
 *
 * Most of the time of a cache hit is two loads that miss the CPU caches (the slot, then the
 * object it holds: ~60% of this function in perf annotate), so both are prefetched ahead:
 * slot i + 2 * AHEAD, and the object in slot i + AHEAD, while value i is made. */
#define AHEAD 8
#define RING 32 /* > 2 * AHEAD, a power of two */
static int fill(PyObject **slots, const Span *spans, Py_ssize_t n, PyObject **cache) {
    PyObject **ring[RING];
    for (Py_ssize_t i = 0; i < n + 2 * AHEAD; i++) {
        if (i < n) {
            PyObject **slot = slot_for(cache, spans[i]);
            ring[i & (RING - 1)] = slot;
            if (slot != NULL) {
                __builtin_prefetch(slot);
            }
        }
        Py_ssize_t j = i - AHEAD;
        if (j >= 0 && j < n && ring[j & (RING - 1)] != NULL && *ring[j & (RING - 1)] != NULL) {
            __builtin_prefetch(*ring[j & (RING - 1)]);
        }
        Py_ssize_t k = i - 2 * AHEAD;
        if (k >= 0) {
            PyObject *value = value_object(ring[k & (RING - 1)], spans[k]);
            if (value == NULL) {
                return 0;
            }
            Py_SETREF(slots[k], value);
        }
    }
    return 1;
}

/* The bucket the model gives a numeric value: 0 if it is empty or not finite as float32, else
 * 1 + the number of boundaries <= it (tf.strings.to_number to float32, then Bucketize, whose
 * upper_bound compares in float32). The parse is strtof in the C locale: correctly rounded,
 * as TensorFlow's. */
static locale_t c_locale(void) {
    static locale_t c = (locale_t)0;
    if (c == (locale_t)0) {
        c = newlocale(LC_ALL_MASK, "C", (locale_t)0);
    }
    return c;
}

/* The float32 TensorFlow parses from a plain decimal ([+-]digits[.digits], at most 15
 * significant digits), without strtof: 1 and *out, or 0 for "use strtof". The mantissa m
 * (< 10^15 < 2^53) and 10^f (f <= 22) are exact doubles, so m / 10^f is the correctly rounded
 * double of the value; rounding that double to float32 is then the correctly rounded float32
 * unless the double lands exactly on a float32 midpoint (double rounding), which is left to
 * strtof, as are subnormal and out-of-range magnitudes. */
/* 0 if x is not finite, else 1 + the number of boundaries <= x (Bucketize's upper_bound). */
static Py_ssize_t float_bucket(float x, const float *bounds, Py_ssize_t n) {
    if (!isfinite(x)) {
        return 0;
    }
    Py_ssize_t lo = 0, hi = n; /* upper_bound: first boundary > x */
    while (lo < hi) {
        Py_ssize_t mid = lo + (hi - lo) / 2;
        if (bounds[mid] <= x) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    return lo + 1;
}

static int fast_float32(const char *p, Py_ssize_t len, float *out) {
    static const double pow10[23] = {1e0,  1e1,  1e2,  1e3,  1e4,  1e5,  1e6,  1e7,
                                     1e8,  1e9,  1e10, 1e11, 1e12, 1e13, 1e14, 1e15,
                                     1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22};
    const char *end = p + len;
    int negative = 0, digits = 0, fraction = 0, dot = 0, any = 0;
    uint64_t m = 0;
    if (p < end && (*p == '+' || *p == '-')) {
        negative = *p == '-';
        p++;
    }
    for (; p < end; p++) {
        char c = *p;
        if (c >= '0' && c <= '9') {
            any = 1;
            fraction += dot;
            if (m == 0 && c == '0') {
                continue; /* leading zeros are not significant */
            }
            if (++digits > 15) {
                return 0;
            }
            m = m * 10 + (uint64_t)(c - '0');
        } else if (c == '.' && !dot) {
            dot = 1;
        } else {
            return 0;
        }
    }
    if (!any || fraction > 22) {
        return 0;
    }
    double v = (double)m / pow10[fraction];
    if (v != 0.0) {
        uint64_t bits;
        memcpy(&bits, &v, sizeof bits);
        /* the 29 bits a float32 drops from a normal double: exactly half is a midpoint */
        if (v < FLT_MIN || v > FLT_MAX || (bits & ((1ULL << 29) - 1)) == (1ULL << 28)) {
            return 0;
        }
    }
    *out = (float)(negative ? -v : v);
    return 1;
}

static Py_ssize_t numeric_bucket_of(const char *p, Py_ssize_t len, const float *bounds,
                                    Py_ssize_t n) {
    char small[128];
    if (len == 0) {
        return 0;
    }
    float x;
    if (fast_float32(p, len, &x)) {
        return float_bucket(x, bounds, n);
    }
    char *buf = len < (Py_ssize_t)sizeof small ? small : PyMem_Malloc((size_t)len + 1);
    if (buf == NULL) {
        return -1;
    }
    memcpy(buf, p, (size_t)len);
    buf[len] = '\0';
    locale_t c = c_locale();
    char *end = buf;
    x = c != (locale_t)0 ? strtof_l(buf, &end, c) : 0.0f; /* no C locale: not parsed */
    int parsed = end == buf + len;
    if (buf != small) {
        PyMem_Free(buf);
    }
    if (!parsed) {
        return -1;
    }
    return float_bucket(x, bounds, n);
}

/* The row of one value of a single-valued field (features.py): categorical
 * ((fp mod 2^62) mod (buckets - 1)) + 1, numeric its bucket, missing 0; plus the offset.
 * -1: a numeric value that does not parse (not for the fast path). */
static int64_t single_row(const FieldPlan *f, Span v) {
    if (v.len == 0) {
        return f->offset;
    }
    if (f->kind == KIND_NUMERIC) {
        Py_ssize_t b = numeric_bucket_of(v.ptr, v.len, f->bounds, f->n_bounds);
        return b < 0 ? -1 : f->offset + b;
    }
    uint64_t fp = fh_fingerprint64(v.ptr, (size_t)v.len) & ((1ULL << 62) - 1);
    return f->offset + 1 + (int64_t)(fp % (uint64_t)(f->buckets - 1));
}

/* [n] int64 rows of a single-valued column (n spans); NULL without error: give up. */
static PyObject *single_rows(const FieldPlan *f, const Span *spans, Py_ssize_t n) {
    npy_intp dims[1] = {n};
    PyObject *array = PyArray_SimpleNew(1, dims, NPY_INT64);
    if (array == NULL) {
        return NULL;
    }
    int64_t *out = PyArray_DATA((PyArrayObject *)array);
    for (Py_ssize_t i = 0; i < n; i++) {
        out[i] = single_row(f, spans[i]);
        if (out[i] < 0) {
            Py_DECREF(array);
            return NULL;
        }
    }
    return array;
}

/* (rows [n, width] int64, weights [n, width] float32) of a multi-valued field: row i holds
 * counts[i] values (fp mod (buckets - 1)) + 1 + offset weighted 1 / count, then padding
 * (offset, weight 0); a row without values puts weight 1 on its last column (features.py). */
static PyObject *multi_rows(const FieldPlan *f, const Span *spans, const uint32_t *counts,
                            Py_ssize_t n, Py_ssize_t width) {
    npy_intp dims[2] = {n, width};
    PyObject *rows = PyArray_SimpleNew(2, dims, NPY_INT64);
    PyObject *weights = rows ? PyArray_SimpleNew(2, dims, NPY_FLOAT32) : NULL;
    if (weights == NULL) {
        Py_XDECREF(rows);
        return NULL;
    }
    int64_t *r = PyArray_DATA((PyArrayObject *)rows);
    float *w = PyArray_DATA((PyArrayObject *)weights);
    const Span *next = spans;
    for (Py_ssize_t i = 0; i < n; i++, r += width, w += width) {
        Py_ssize_t c = counts[i];
        float each = 1.0f / (float)(c > 0 ? c : 1);
        for (Py_ssize_t j = 0; j < width; j++) {
            if (j < c) {
                uint64_t fp = fh_fingerprint64(next[j].ptr, (size_t)next[j].len);
                r[j] = f->offset + 1 + (int64_t)(fp % (uint64_t)(f->buckets - 1));
                w[j] = each;
            } else {
                r[j] = f->offset;
                w[j] = (c == 0 && j == width - 1) ? 1.0f : 0.0f;
            }
        }
        next += c;
    }
    PyObject *pair = PyTuple_Pack(2, rows, weights);
    Py_DECREF(rows);
    Py_DECREF(weights);
    return pair;
}

/* What an absent field decodes to in a rows plan: n missing rows. */
static PyObject *absent_rows(const FieldPlan *f, Py_ssize_t n) {
    if (f->kind != KIND_MULTI) {
        npy_intp dims[1] = {n};
        PyObject *array = PyArray_SimpleNew(1, dims, NPY_INT64);
        int64_t *out = array ? PyArray_DATA((PyArrayObject *)array) : NULL;
        for (Py_ssize_t i = 0; out != NULL && i < n; i++) {
            out[i] = f->offset;
        }
        return array;
    }
    uint32_t *zeros = PyMem_Calloc((size_t)(n ? n : 1), sizeof(uint32_t));
    if (zeros == NULL) {
        return PyErr_NoMemory();
    }
    PyObject *pair = multi_rows(f, NULL, zeros, n, 1);
    PyMem_Free(zeros);
    return pair;
}

/* The array of a context field present in the request; *missing += 1 if it counts as
 * missing. NULL without an error set: not for the fast path. */
static PyObject *context_array(const FieldPlan *f, Scratch *s, const Plan *plan,
                               PyObject *blank, Py_ssize_t *missing) {
    Py_ssize_t limit = plan->max_value_bytes;
    Py_ssize_t empty;
    if (s->n_counts != 0) {
        return NULL;
    }
    if (f->kind == KIND_MULTI) {
        if (s->n > f->max_values || !spans_pass(s, limit, 0, 0, &empty)) {
            return NULL;
        }
        if (s->n == 0) {
            ++*missing;
            return plan->rows ? absent_rows(f, 1) : Py_NewRef(f->absent);
        }
        if (plan->rows) {
            uint32_t count = (uint32_t)s->n;
            return multi_rows(f, s->spans, &count, 1, s->n + 1);
        }
        npy_intp dims[2] = {1, s->n};
        PyObject *row = empty_values(2, dims, blank);
        if (row != NULL && !fill(PyArray_DATA((PyArrayObject *)row), s->spans, s->n, plan->cache)) {
            Py_CLEAR(row);
        }
        return row;
    }
    if (s->n > 1) {
        return NULL;
    }
    if (s->n == 0 || s->spans[0].len == 0) {
        ++*missing;
        return plan->rows ? absent_rows(f, 1) : Py_NewRef(f->absent);
    }
    if (!spans_pass(s, limit, 0, f->kind == KIND_NUMERIC, &empty)) {
        return NULL;
    }
    if (plan->rows) {
        return single_rows(f, s->spans, 1);
    }
    npy_intp dims[1] = {1};
    PyObject *row = empty_values(1, dims, blank);
    if (row != NULL && !fill(PyArray_DATA((PyArrayObject *)row), s->spans, 1, plan->cache)) {
        Py_CLEAR(row);
    }
    return row;
}

/* The array of a candidate column present in the request (see context_array). */
static PyObject *column_array(const FieldPlan *f, Scratch *s, Py_ssize_t k, const Plan *plan,
                              PyObject *blank, Py_ssize_t *missing) {
    Py_ssize_t limit = plan->max_value_bytes;
    Py_ssize_t empty;
    if (f->kind != KIND_MULTI) {
        if (s->n_counts != 0 || s->n != k ||
            !spans_pass(s, limit, 1, f->kind == KIND_NUMERIC, &empty)) {
            return NULL;
        }
        *missing += empty;
        if (plan->rows) {
            return single_rows(f, s->spans, k);
        }
        npy_intp dims[1] = {k};
        PyObject *column = empty_values(1, dims, blank);
        if (column != NULL && !fill(PyArray_DATA((PyArrayObject *)column), s->spans, k, plan->cache)) {
            Py_CLEAR(column);
        }
        return column;
    }
    if (s->n == 0 && s->n_counts == 0) {
        *missing += k;
        if (plan->rows) {
            return absent_rows(f, k);
        }
        npy_intp dims[2] = {k, 1};
        return empty_values(2, dims, blank);
    }
    if (s->n_counts != k || !spans_pass(s, limit, 0, 0, &empty)) {
        return NULL;
    }
    Py_ssize_t widest = 0, total = 0, zero_rows = 0;
    for (Py_ssize_t i = 0; i < k; i++) {
        Py_ssize_t c = s->counts[i] > (uint32_t)f->max_values ? f->max_values + 1 : s->counts[i];
        widest = c > widest ? c : widest;
        total += c;
        zero_rows += c == 0;
    }
    if (widest > f->max_values || total != s->n) {
        return NULL;
    }
    if (plan->rows) {
        *missing += zero_rows;
        return multi_rows(f, s->spans, s->counts, k, widest + 1);
    }
    npy_intp width = widest > 1 ? widest : 1, dims[2] = {k, width};
    PyObject *column = empty_values(2, dims, blank);
    if (column == NULL) {
        return NULL;
    }
    PyObject **slots = PyArray_DATA((PyArrayObject *)column);
    const Span *next = s->spans;
    for (Py_ssize_t i = 0; i < k; i++) {
        if (!fill(slots + i * width, next, s->counts[i], plan->cache)) {
            Py_DECREF(column);
            return NULL;
        }
        next += s->counts[i];
    }
    *missing += zero_rows;
    return column;
}

/* Index of the field named by key among fields[0:n], or -1. */
static Py_ssize_t find_field(const FieldPlan *fields, Py_ssize_t n, Reader key) {
    Py_ssize_t len = key.end - key.p;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (PyBytes_GET_SIZE(fields[i].name) == len &&
            memcmp(PyBytes_AS_STRING(fields[i].name), key.p, len) == 0) {
            return i;
        }
    }
    return -1;
}

static PyObject *decode(PyObject *self, PyObject *args) {
    PyObject *data, *capsule;
    Py_ssize_t k;
    if (!PyArg_ParseTuple(args, "OOn:decode", &data, &capsule, &k)) {
        return NULL;
    }
    Plan *plan = PyCapsule_GetPointer(capsule, PLAN);
    if (plan == NULL) {
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    Py_ssize_t n_fields = plan->n_context + plan->n_candidates, missing = 0;
    PyObject **arrays = PyMem_Calloc(n_fields + 1, sizeof(PyObject *));
    PyObject *blank = PyBytes_FromStringAndSize(NULL, 0);
    PyObject *context = NULL, *candidates = NULL, *result = NULL;
    Scratch scratch = {0};
    int usual = arrays != NULL && blank != NULL;
    Reader r = {view.buf, (const uint8_t *)view.buf + view.len}, inner, key, value;
    uint32_t field, wire_type;
    uint64_t ignored;
    while (usual && read_tag(&r, &field, &wire_type)) {
        if (field == F_NUM_CANDIDATES) {
            usual = read_varint(&r, &ignored);
            continue;
        }
        usual = read_len(&r, &inner);
        if (!usual || (field != F_CONTEXT && field != F_CANDIDATES)) {
            continue;
        }
        int is_context = field == F_CONTEXT;
        usual = read_entry(inner, &key, &value);
        const FieldPlan *fields = plan->fields + (is_context ? 0 : plan->n_context);
        Py_ssize_t i = usual ? find_field(fields, is_context ? plan->n_context
                                                             : plan->n_candidates, key)
                             : -1;
        if (i < 0 || arrays[(is_context ? 0 : plan->n_context) + i] != NULL ||
            !collect(value, &scratch)) { /* an unknown or repeated key */
            usual = 0;
            break;
        }
        PyObject **slot = arrays + (is_context ? 0 : plan->n_context) + i;
        *slot = is_context ? context_array(&fields[i], &scratch, plan, blank, &missing)
                           : column_array(&fields[i], &scratch, k, plan, blank, &missing);
        usual = *slot != NULL;
    }
    if (usual && !PyErr_Occurred()) {
        context = PyDict_New();
        candidates = context ? PyDict_New() : NULL;
        for (Py_ssize_t i = 0; candidates != NULL && i < n_fields; i++) {
            const FieldPlan *f = &plan->fields[i];
            if (arrays[i] == NULL) { /* absent */
                if (plan->rows) {
                    arrays[i] = absent_rows(f, i < plan->n_context ? 1 : k);
                    missing += i < plan->n_context ? 1 : k;
                } else if (i < plan->n_context) {
                    arrays[i] = Py_NewRef(f->absent);
                    missing += 1;
                } else {
                    npy_intp dims[2] = {k, 1};
                    arrays[i] = empty_values(f->kind == KIND_MULTI ? 2 : 1, dims, blank);
                    missing += k;
                }
            }
            if (arrays[i] == NULL ||
                PyDict_SetItem(i < plan->n_context ? context : candidates, f->key, arrays[i])) {
                Py_CLEAR(candidates);
            }
        }
        if (candidates != NULL) {
            result = Py_BuildValue("(OOn)", context, candidates, missing);
        }
    }
    for (Py_ssize_t i = 0; arrays != NULL && i < n_fields; i++) {
        Py_XDECREF(arrays[i]);
    }
    PyMem_Free(arrays);
    PyMem_Free(scratch.spans);
    PyMem_Free(scratch.counts);
    Py_XDECREF(blank);
    Py_XDECREF(context);
    Py_XDECREF(candidates);
    PyBuffer_Release(&view);
    if (result == NULL && !PyErr_Occurred()) {
        Py_RETURN_NONE;
    }
    return result;
}

/* fingerprint64(data) -> FarmHash Fingerprint64 of data (TensorFlow's string hash). */
static PyObject *fingerprint64(PyObject *self, PyObject *arg) {
    char *data;
    Py_ssize_t len;
    if (PyBytes_AsStringAndSize(arg, &data, &len) < 0) {
        return NULL;
    }
    return PyLong_FromUnsignedLongLong(fh_fingerprint64(data, (size_t)len));
}

/* numeric_bucket(value, boundaries) -> int (see numeric_bucket_of); ValueError if not a number. */
static PyObject *numeric_bucket(PyObject *self, PyObject *args) {
    const char *data;
    Py_ssize_t len;
    PyObject *seq;
    if (!PyArg_ParseTuple(args, "y#O", &data, &len, &seq)) {
        return NULL;
    }
    Py_ssize_t n;
    float *bounds = float_array(seq, &n);
    if (bounds == NULL) {
        return NULL;
    }
    Py_ssize_t bucket = numeric_bucket_of(data, len, bounds, n);
    PyMem_Free(bounds);
    if (bucket < 0) {
        PyErr_SetString(PyExc_ValueError, "not a decimal number");
        return NULL;
    }
    return PyLong_FromSsize_t(bucket);
}

/* The bytes of a list of bytes objects as spans (PyMem, at least one slot); NULL with an
 * error set if an item is not bytes. The list keeps the objects alive. */
static Span *spans_of(PyObject *list, Py_ssize_t n, Span *out) {
    for (Py_ssize_t i = 0; i < n; i++) {
        char *ptr;
        if (PyBytes_AsStringAndSize(PyList_GET_ITEM(list, i), &ptr, &out[i].len) < 0) {
            return NULL;
        }
        out[i].ptr = ptr;
    }
    return out;
}

/* field_rows(plan, index, values) -> the rows of field `index` (context then candidates) for
 * values decoded elsewhere (upb + the Python checks): a list of bytes for a single-valued
 * field -> int64 [n]; for a multi-valued one a list of lists of its non-empty values ->
 * (rows, weights) [n, widest + 1]. The same code as decode's, so both paths give the same
 * rows. ValueError for a numeric value that does not parse. */
static PyObject *field_rows(PyObject *self, PyObject *args) {
    PyObject *capsule, *values;
    Py_ssize_t index;
    if (!PyArg_ParseTuple(args, "OnO!:field_rows", &capsule, &index, &PyList_Type, &values)) {
        return NULL;
    }
    Plan *plan = PyCapsule_GetPointer(capsule, PLAN);
    if (plan == NULL) {
        return NULL;
    }
    if (!plan->rows || index < 0 || index >= plan->n_context + plan->n_candidates) {
        PyErr_SetString(PyExc_ValueError, "field_rows: needs a rows plan and a field index");
        return NULL;
    }
    const FieldPlan *f = &plan->fields[index];
    Py_ssize_t n = PyList_GET_SIZE(values), total = n;
    uint32_t *counts = NULL;
    if (f->kind == KIND_MULTI) {
        counts = PyMem_Calloc((size_t)(n + 1), sizeof(uint32_t));
        if (counts == NULL) {
            return PyErr_NoMemory();
        }
        total = 0;
        for (Py_ssize_t i = 0; i < n; i++) {
            PyObject *row = PyList_GET_ITEM(values, i);
            if (!PyList_Check(row)) {
                PyMem_Free(counts);
                PyErr_SetString(PyExc_TypeError, "field_rows: a multi-valued row is a list");
                return NULL;
            }
            counts[i] = (uint32_t)PyList_GET_SIZE(row);
            total += counts[i];
        }
    }
    Span *spans = PyMem_Malloc((size_t)(total + 1) * sizeof(Span));
    PyObject *result = NULL;
    int ok = spans != NULL;
    if (!ok) {
        PyErr_NoMemory();
    }
    if (ok && counts == NULL) {
        ok = spans_of(values, n, spans) != NULL;
        result = ok ? single_rows(f, spans, n) : NULL;
        if (ok && result == NULL && !PyErr_Occurred()) {
            PyErr_SetString(PyExc_ValueError, "field_rows: a numeric value is not a number");
        }
    } else if (ok) {
        Py_ssize_t at = 0, widest = 0;
        for (Py_ssize_t i = 0; ok && i < n; i++) {
            ok = spans_of(PyList_GET_ITEM(values, i), counts[i], spans + at) != NULL;
            at += counts[i];
            widest = counts[i] > widest ? counts[i] : widest;
        }
        result = ok ? multi_rows(f, spans, counts, n, widest + 1) : NULL;
    }
    PyMem_Free(spans);
    PyMem_Free(counts);
    return result;
}

static PyMethodDef methods[] = {
    {"header", header, METH_O,
     "header(data) -> (request_id, model, num_candidates), or None: not the usual shape"},
    {"Plan", make_plan, METH_VARARGS,
     "Plan(context, candidates, max_value_bytes[, rows]) -> the schema as decode() reads it"},
    {"decode", decode, METH_VARARGS,
     "decode(data, plan, k) -> (context, candidates, missing), or None: let Python decide"},
    {"field_rows", field_rows, METH_VARARGS,
     "field_rows(plan, index, values) -> one field's table rows, hashed as decode() hashes"},
    {"numeric_bucket", numeric_bucket, METH_VARARGS,
     "numeric_bucket(value, boundaries) -> the model's bucket of a numeric value (0: missing)"},
    {"fingerprint64", fingerprint64, METH_O,
     "fingerprint64(data) -> FarmHash Fingerprint64 of the bytes, as TensorFlow hashes strings"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_wire", "PredictRequest wire bytes to the codec's arrays.", -1,
    methods,
};

PyMODINIT_FUNC PyInit__wire(void) {
    import_array();
    return PyModule_Create(&module);
}
