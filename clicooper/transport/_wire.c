/* Native fast path of the wire codec (clicooper/transport/codec.py holds the reference).
 *
 * Why native: a round trip of a 1 MB tensor is one copy and one validating read, about 60 us on
 * our machines; the two Python calls around them spent another 70 us on per-message work (struct
 * unpacking, string and padding checks, a `torch.sum` dispatch, dataclass plumbing). This file does
 * that work in C for the messages it can take, and nothing else:
 *
 * - `parse(data)`: every check `codec._decode` makes on a peer's bytes, in one pass, returning the
 *   message built but for its tensors (where they are and what they hold), or None when anything is
 *   wrong. codec.py then runs the Python decoder on the same bytes, which raises the precise
 *   CodecError: error messages have one source, and the tests check that both decoders accept
 *   exactly the same inputs.
 * - `pack(msg, kind_id, tensors, alloc)`: the bytes `codec.encode` (or `encode_frame`, alloc None)
 *   writes, or None for anything but exactly typed fields and C-contiguous tensors, which then take
 *   the Python path.
 * - `copy(msg, kind_id, tensors, alloc)`: `parse(pack(...))` for delivery between parties in one
 *   process, the tensors checked for finiteness while they are copied.
 * - `copy_finite(dst, src, offset, dtype_id)`: a copy of bytes from a network, checked for
 *   finiteness from the bits (exponent all ones) as it is copied; `parse` checks a writable
 *   buffer's tensors in place with the same check.
 * - `finite(buffer, dtype_id)`: the same check on a tensor's own memory, for finite.py (a party's
 *   gradients before its optimiser steps).
 *
 * Everything a peer controls is bounds-checked before it is read; sizes are checked against
 * MAX_MESSAGE_BYTES before any multiplication can overflow. Little-endian hosts only (the wire's
 * byte order); elsewhere the module refuses to import and codec.py stays on the Python path.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the wire is little-endian: build the native codec only on little-endian hosts"
#endif

#define WIRE_VERSION 2
#define NATIVE_API 2            /* what codec.py expects of these functions: 1 returned tuples from parse */
#define MAX_MESSAGE_BYTES ((uint64_t)512 * 1024 * 1024)
#define MAX_HEADER_BYTES ((uint64_t)1024 * 1024)
#define MAX_DIMS 8
#define ALIGN 64
#define MAX_KINDS 64
#define MAX_FIELDS 32
#define PREFIX_SIZE 6           /* u32 header length, u8 version, u8 kind */
#define HEADER_COUNTERS 3       /* round, step, seq: i64 */
#define HEADER_TEXTS 3          /* job_id, sender, receiver: u32 lengths */
#define TENSOR_SLOT (2 + 8 * MAX_DIMS)
#define CHUNK (16 * 1024)       /* copy-then-check block: stays in L1 between the two */

/* A message kind's fixed part, registered by codec.py from its dataclass. Scalar codes:
 * 'q' int (i64), 'd' float (f64), 'b' bool (u8 0/1), 's' str (u32 byte length). */
typedef struct {
    int used;
    PyObject *cls; /* the message's dataclass */
    int n_scalars;
    char codes[MAX_FIELDS];
    PyObject *names[MAX_FIELDS];
    int n_tensors;
    Py_ssize_t fixed_size;
} Layout;

static Layout layouts[MAX_KINDS];
static PyObject *header_names[HEADER_COUNTERS + HEADER_TEXTS]; /* job_id, sender, receiver, round, step, seq */
static PyObject *str_header;
static PyObject *header_cls;  /* messages.Header, set by `header_class` */
static PyObject *empty_tuple;

/* Wire dtype ids (codec._WIRE_DTYPES, counted from 1): float32, float64, float16, bfloat16, int64,
 * int32, uint8. Finiteness is checked for the floating ones. */
static const int ITEMSIZE[8] = {0, 4, 8, 2, 2, 8, 4, 1};
#define N_DTYPES 7

static uint64_t rd_u64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static uint32_t rd_u32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static void wr_u64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }
static void wr_u32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }
static uint64_t pad_of(uint64_t n) { return (ALIGN - n % ALIGN) % ALIGN; }

static Py_ssize_t scalar_size(char code) {
    switch (code) {
    case 'q': case 'd': return 8;
    case 'b': return 1;
    case 's': return 4;
    default: return -1;
    }
}

/* ---- finiteness from the bits: a value is NaN or infinite iff its exponent bits are all ones.
 * Adding the exponent's lowest bit to the masked exponent carries into the sign bit exactly then,
 * so one AND, one ADD and one OR a value, which compilers vectorise. */

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define VECTOR_CLONES
#endif

/* name(p, n): whether the n values of `type` at p are finite, for a format whose exponent bits are
 * `exp` and whose sign bit is `sign` (exp + its lowest bit carries into the sign bit). The values
 * are read 128 bytes an iteration, each into an accumulator of its own (four AVX2 registers, eight
 * SSE2 ones in the default build): with one accumulator, the loop read a 1 MB tensor about 13%
 * slower in a fast process and 35% in a slow one (BENCHMARKS.md, fourteenth stop). */
#define FINITE_BLOCK 128
#define DEFINE_FINITE(name, type, exp, sign)                                   \
    VECTOR_CLONES static int name(const uint8_t *p, size_t n) {                 \
        enum { LANES = FINITE_BLOCK / sizeof(type) };                          \
        type lanes[LANES] = {0}, acc = 0;                                      \
        size_t i = 0;                                                          \
        for (; i + LANES <= n; i += LANES)                                     \
            for (size_t k = 0; k < LANES; k++) {                               \
                type x;                                                        \
                memcpy(&x, p + sizeof(type) * (i + k), sizeof(type));          \
                lanes[k] |= (type)((x & (exp)) + ((exp) & -(exp)));            \
            }                                                                  \
        for (size_t k = 0; k < LANES; k++)                                     \
            acc |= lanes[k];                                                   \
        for (; i < n; i++) {                                                   \
            type x;                                                            \
            memcpy(&x, p + sizeof(type) * i, sizeof(type));                    \
            acc |= (type)((x & (exp)) + ((exp) & -(exp)));                     \
        }                                                                      \
        return !(acc & (sign));                                                \
    }

DEFINE_FINITE(finite32, uint32_t, 0x7f800000u, 0x80000000u)
DEFINE_FINITE(finite64, uint64_t, 0x7ff0000000000000ull, 0x8000000000000000ull)
DEFINE_FINITE(finite_half, uint16_t, 0x7c00u, 0x8000u)
DEFINE_FINITE(finite_bfloat, uint16_t, 0x7f80u, 0x8000u)

/* whether `nbytes` of dtype `dtype_id` at p are all finite (non-floating dtypes always are) */
static int finite_bytes(int dtype_id, const uint8_t *p, size_t nbytes) {
    switch (dtype_id) {
    case 1: return finite32(p, nbytes / 4);
    case 2: return finite64(p, nbytes / 8);
    case 3: return finite_half(p, nbytes / 2);
    case 4: return finite_bfloat(p, nbytes / 2);
    default: return 1;
    }
}

/* copy block by block, checking each block just after copying it, while it is in L1: the copy is
 * not read again from memory (timed warm, no faster than a whole copy and then a whole check, and
 * no slower; in a running chain, where the copy has left the caches by the check, slightly faster:
 * BENCHMARKS.md) */
static int copy_finite_bytes(int dtype_id, uint8_t *dst, const uint8_t *src, size_t nbytes) {
    int ok = 1;
    for (size_t at = 0; at < nbytes; at += CHUNK) {
        size_t len = nbytes - at < CHUNK ? nbytes - at : CHUNK;
        memcpy(dst + at, src + at, len);
        ok &= finite_bytes(dtype_id, dst + at, len);
    }
    return ok;
}

static int all_zero(const uint8_t *p, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (p[i])
            return 0;
    return 1;
}

/* ---- decoding */

/* An instance of the dataclass `cls` built as codec.py's `_fills_directly` allows: made by
 * `object.__new__`, its `n` fields `names` set to `values` (borrowed) in its __dict__, without the
 * dataclass's `__init__` (which sets each field of a frozen dataclass through `object.__setattr__`:
 * about 5 us a message once a megabyte-sized tensor had swept the caches, BENCHMARKS.md). `cls` is
 * one `plain_class` accepted. New reference, or NULL with an exception set. */
static PyObject *filled(PyObject *cls, PyObject *const *names, PyObject *const *values, int n) {
    PyObject *obj = PyBaseObject_Type.tp_new((PyTypeObject *)cls, empty_tuple, NULL);
    if (!obj)
        return NULL;
    PyObject *dict = PyObject_GenericGetDict(obj, NULL);
    int ok = dict != NULL;
    for (int i = 0; ok && i < n; i++)
        ok = PyDict_SetItem(dict, names[i], values[i]) == 0;
    Py_XDECREF(dict);
    if (!ok)
        Py_CLEAR(obj);
    return obj;
}

/* A valid message as (kind, message, ((dtype_id, shape, offset, count), ...), readonly): the message
 * with its header and scalar fields, its tensor fields for codec.py to set from the specs; or Py_None
 * (a new reference) when anything is invalid, or NULL with an exception set when Python itself
 * fails (out of memory). */
static PyObject *parse_bytes(const uint8_t *buf, uint64_t size, int readonly, int check_tensors) {
    if (size > MAX_MESSAGE_BYTES || size < PREFIX_SIZE)
        Py_RETURN_NONE;
    uint64_t n = rd_u32(buf);
    int version = buf[4], kind = buf[5];
    if (version != WIRE_VERSION || kind >= MAX_KINDS || !layouts[kind].used)
        Py_RETURN_NONE;
    const Layout *L = &layouts[kind];
    uint64_t end = 4 + n;
    if (n > MAX_HEADER_BYTES || end > size || end % ALIGN || end < (uint64_t)L->fixed_size)
        Py_RETURN_NONE;

    const uint8_t *p = buf + PREFIX_SIZE;
    int64_t counters[HEADER_COUNTERS];
    for (int i = 0; i < HEADER_COUNTERS; i++, p += 8) {
        counters[i] = (int64_t)rd_u64(p);
        if (counters[i] < 0)
            Py_RETURN_NONE;
    }
    uint64_t text_len[HEADER_TEXTS + MAX_FIELDS];
    int n_texts = 0;
    for (int i = 0; i < HEADER_TEXTS; i++, p += 4)
        text_len[n_texts++] = rd_u32(p);
    const uint8_t *scalar_at[MAX_FIELDS];
    for (int i = 0; i < L->n_scalars; i++) {
        scalar_at[i] = p;
        if (L->codes[i] == 's')
            text_len[n_texts++] = rd_u32(p);
        p += scalar_size(L->codes[i]);
    }
    const uint8_t *tensor_at = p;

    /* the strings, then the header's padding */
    uint64_t at = (uint64_t)L->fixed_size;
    for (int i = 0; i < n_texts; i++) {
        at += text_len[i];
        if (at > end)
            Py_RETURN_NONE;
    }
    if (at + pad_of(at) != end || !all_zero(buf + at, end - at))
        Py_RETURN_NONE;

    /* the tensors' descriptions and bytes, before any Python object is made */
    int64_t shapes[MAX_FIELDS][MAX_DIMS];
    int ndims[MAX_FIELDS], dtypes[MAX_FIELDS];
    uint64_t offsets[MAX_FIELDS], counts[MAX_FIELDS];
    uint64_t offset = end;
    for (int t = 0; t < L->n_tensors; t++) {
        const uint8_t *d = tensor_at + (size_t)t * TENSOR_SLOT;
        int dtype_id = d[0], ndim = d[1];
        if (dtype_id < 1 || dtype_id > N_DTYPES || ndim > MAX_DIMS)
            Py_RETURN_NONE;
        int empty = 0;
        for (int k = 0; k < MAX_DIMS; k++) {
            uint64_t dim = rd_u64(d + 2 + 8 * k);
            if (dim > MAX_MESSAGE_BYTES || (k >= ndim && dim))
                Py_RETURN_NONE;
            if (k < ndim) {
                shapes[t][k] = (int64_t)dim;
                empty |= dim == 0;
            }
        }
        /* a zero dimension makes the tensor empty whatever the others are (as math.prod says);
         * otherwise both factors are <= 2^29 and a product above 2^29 is refused: no overflow */
        uint64_t count = empty ? 0 : 1;
        for (int k = 0; k < ndim && count; k++) {
            count *= (uint64_t)shapes[t][k];
            if (count > MAX_MESSAGE_BYTES)
                Py_RETURN_NONE;
        }
        uint64_t nbytes = count * (uint64_t)ITEMSIZE[dtype_id];
        uint64_t padded = nbytes + pad_of(nbytes);
        if (nbytes > MAX_MESSAGE_BYTES || offset + padded > size)
            Py_RETURN_NONE;
        if (check_tensors && !finite_bytes(dtype_id, buf + offset, nbytes))
            Py_RETURN_NONE;
        if (!all_zero(buf + offset + nbytes, padded - nbytes))
            Py_RETURN_NONE;
        ndims[t] = ndim;
        dtypes[t] = dtype_id;
        offsets[t] = offset;
        counts[t] = count;
        offset += padded;
    }
    if (offset != size)
        Py_RETURN_NONE;

    /* scalars that a peer can get wrong */
    for (int i = 0; i < L->n_scalars; i++) {
        if (L->codes[i] == 'b' && scalar_at[i][0] > 1)
            Py_RETURN_NONE;
        if (L->codes[i] == 'd') {
            double v;
            memcpy(&v, scalar_at[i], 8);
            if (!isfinite(v))
                Py_RETURN_NONE;
        }
    }

    /* valid so far: build the Python objects (the strings' UTF-8 is checked here) */
    PyObject *texts[HEADER_TEXTS + MAX_FIELDS] = {0};
    PyObject *counter_objs[HEADER_COUNTERS] = {0};
    PyObject *fields[1 + MAX_FIELDS] = {0}; /* the message's: its header, then its scalars */
    int n_fields = 0;
    PyObject *header = NULL, *msg = NULL, *tensors = NULL, *result = NULL;
    if (!header_cls)
        Py_RETURN_NONE; /* no header class given: the Python path decodes */
    at = (uint64_t)L->fixed_size;
    for (int i = 0; i < n_texts; i++) {
        texts[i] = PyUnicode_DecodeUTF8((const char *)buf + at, (Py_ssize_t)text_len[i], "strict");
        at += text_len[i];
        if (!texts[i]) {
            if (!PyErr_ExceptionMatches(PyExc_UnicodeDecodeError))
                goto fail;
            PyErr_Clear();
            result = Py_NewRef(Py_None);
            goto fail;
        }
    }
    PyObject *header_values[HEADER_TEXTS + HEADER_COUNTERS] = {texts[0], texts[1], texts[2]};
    for (int i = 0; i < HEADER_COUNTERS; i++)
        if (!(header_values[HEADER_TEXTS + i] = counter_objs[i] = PyLong_FromLongLong(counters[i])))
            goto fail;
    if (!(header = filled(header_cls, header_names, header_values, HEADER_TEXTS + HEADER_COUNTERS)))
        goto fail;
    if (!(tensors = PyTuple_New(L->n_tensors)))
        goto fail;
    fields[n_fields++] = Py_NewRef(header);
    int next_text = HEADER_TEXTS;
    for (int i = 0; i < L->n_scalars; i++) {
        PyObject *v = NULL;
        switch (L->codes[i]) {
        case 'q': v = PyLong_FromLongLong((long long)rd_u64(scalar_at[i])); break;
        case 'd': { double x; memcpy(&x, scalar_at[i], 8); v = PyFloat_FromDouble(x); break; }
        case 'b': v = PyBool_FromLong(scalar_at[i][0]); break;
        case 's': v = Py_NewRef(texts[next_text++]); break;
        }
        if (!v)
            goto fail;
        fields[n_fields++] = v;
    }
    PyObject *field_names[1 + MAX_FIELDS] = {str_header};
    for (int i = 0; i < L->n_scalars; i++)
        field_names[1 + i] = L->names[i];
    if (!(msg = filled(L->cls, field_names, fields, n_fields)))
        goto fail;
    for (int t = 0; t < L->n_tensors; t++) {
        PyObject *shape = PyTuple_New(ndims[t]);
        if (!shape)
            goto fail;
        for (int k = 0; k < ndims[t]; k++) {
            PyObject *dim = PyLong_FromLongLong(shapes[t][k]);
            if (!dim) {
                Py_DECREF(shape);
                goto fail;
            }
            PyTuple_SET_ITEM(shape, k, dim);
        }
        PyObject *spec = Py_BuildValue("(iNKK)", dtypes[t], shape, (unsigned long long)offsets[t],
                                       (unsigned long long)counts[t]);
        if (!spec)
            goto fail;
        PyTuple_SET_ITEM(tensors, t, spec);
    }
    result = Py_BuildValue("(iOOO)", kind, msg, tensors, readonly ? Py_True : Py_False);
fail:
    for (int i = 0; i < n_texts; i++)
        Py_XDECREF(texts[i]);
    for (int i = 0; i < HEADER_COUNTERS; i++)
        Py_XDECREF(counter_objs[i]);
    for (int i = 0; i < n_fields; i++)
        Py_XDECREF(fields[i]);
    Py_XDECREF(header);
    Py_XDECREF(msg);
    Py_XDECREF(tensors);
    return result;
}

static PyObject *wire_parse(PyObject *self, PyObject *arg) {
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_ND) < 0) {
        PyErr_Clear(); /* not a contiguous buffer: the Python path says what it is */
        Py_RETURN_NONE;
    }
    if (view.ndim != 1 || view.itemsize != 1) { /* the reference counts len(data) items, not bytes */
        PyBuffer_Release(&view);
        Py_RETURN_NONE;
    }
    /* a read-only buffer's tensors are checked later, while copy_finite copies them */
    PyObject *parsed = parse_bytes(view.buf, (uint64_t)view.len, view.readonly, !view.readonly);
    PyBuffer_Release(&view);
    return parsed;
}

/* ---- finiteness and copies for codec.py's tensors */

static PyObject *wire_copy_finite(PyObject *self, PyObject *args) {
    PyObject *dst_obj, *src_obj;
    Py_ssize_t offset;
    int dtype_id;
    if (!PyArg_ParseTuple(args, "OOni", &dst_obj, &src_obj, &offset, &dtype_id))
        return NULL;
    if (dtype_id < 1 || dtype_id > N_DTYPES) {
        PyErr_SetString(PyExc_ValueError, "copy_finite: unknown dtype id");
        return NULL;
    }
    Py_buffer dst, src;
    if (PyObject_GetBuffer(dst_obj, &dst, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
        return NULL;
    if (PyObject_GetBuffer(src_obj, &src, PyBUF_C_CONTIGUOUS) < 0) {
        PyBuffer_Release(&dst);
        return NULL;
    }
    PyObject *out = NULL;
    if (offset < 0 || offset > src.len || dst.len > src.len - offset)
        PyErr_SetString(PyExc_ValueError, "copy_finite: the source is shorter than the destination");
    else if (dst.len % ITEMSIZE[dtype_id])
        PyErr_SetString(PyExc_ValueError, "copy_finite: the destination is not whole values of the dtype");
    else {
        int ok;
        Py_BEGIN_ALLOW_THREADS
        ok = copy_finite_bytes(dtype_id, dst.buf, (const uint8_t *)src.buf + offset, (size_t)dst.len);
        Py_END_ALLOW_THREADS
        out = PyBool_FromLong(ok);
    }
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    return out;
}

/* finite(buffer, dtype_id) -> bool: whether the values in a C-contiguous buffer are all finite.
 * For finite.py: a party's gradients checked before its optimiser steps, at the speed of a read
 * and with one Python call, where `float(t.sum())` dispatched a torch reduction per tensor. Most
 * gradients are small: the GIL is kept for them, where releasing it could hand it to the background
 * thread (background.py) and wait for it back. */
#define RELEASE_GIL_BYTES (64 * 1024)
static PyObject *wire_finite(PyObject *self, PyObject *args) {
    PyObject *obj;
    int dtype_id;
    if (!PyArg_ParseTuple(args, "Oi", &obj, &dtype_id))
        return NULL;
    if (dtype_id < 1 || dtype_id > N_DTYPES) {
        PyErr_SetString(PyExc_ValueError, "finite: unknown dtype id");
        return NULL;
    }
    Py_buffer b;
    if (PyObject_GetBuffer(obj, &b, PyBUF_C_CONTIGUOUS) < 0)
        return NULL;
    PyObject *out = NULL;
    if (b.len % ITEMSIZE[dtype_id])
        PyErr_SetString(PyExc_ValueError, "finite: the buffer is not whole values of the dtype");
    else if (b.len < RELEASE_GIL_BYTES)
        out = PyBool_FromLong(finite_bytes(dtype_id, b.buf, (size_t)b.len));
    else {
        int ok;
        Py_BEGIN_ALLOW_THREADS
        ok = finite_bytes(dtype_id, b.buf, (size_t)b.len);
        Py_END_ALLOW_THREADS
        out = PyBool_FromLong(ok);
    }
    PyBuffer_Release(&b);
    return out;
}

/* ---- encoding */

/* `obj`'s UTF-8 bytes if it is exactly a str; NULL (no exception) otherwise */
static const char *utf8_of(PyObject *obj, Py_ssize_t *len) {
    if (!obj || !PyUnicode_CheckExact(obj))
        return NULL;
    const char *s = PyUnicode_AsUTF8AndSize(obj, len);
    if (!s)
        PyErr_Clear(); /* e.g. a lone surrogate: the Python path raises the CodecError */
    return s;
}

/* an exactly-int value in the signed 64-bit range into *out; 0 otherwise */
static int int_of(PyObject *obj, long long *out) {
    if (!obj || !PyLong_CheckExact(obj))
        return 0;
    int overflow;
    *out = PyLong_AsLongLongAndOverflow(obj, &overflow);
    if (overflow || (*out == -1 && PyErr_Occurred())) {
        PyErr_Clear();
        return 0;
    }
    return 1;
}

#define MAX_TEXTS (HEADER_TEXTS + MAX_FIELDS)

/* pack(msg, kind_id, tensors, alloc): tensors is a tuple of (dtype_id, C-contiguous buffer with
 * the tensor's shape), one per tensor field in order. With `alloc` (byte_buffer), returns a
 * writable memoryview of the message, 64-byte aligned in the array alloc(size + 64) returned;
 * without, the message as bytes. None when a field is not exactly what the fast path takes, or
 * (with `check`) a tensor is not finite. */
static PyObject *pack_impl(PyObject *msg, int kind, PyObject *tensor_specs, PyObject *alloc, int check) {
    if (kind < 0 || kind >= MAX_KINDS || !layouts[kind].used)
        Py_RETURN_NONE;
    const Layout *L = &layouts[kind];
    if (PyTuple_GET_SIZE(tensor_specs) != L->n_tensors)
        Py_RETURN_NONE;

    PyObject *held[HEADER_COUNTERS + HEADER_TEXTS + MAX_FIELDS + 1] = {0};
    int n_held = 0;
    Py_buffer views[MAX_FIELDS];
    int n_views = 0;
    PyObject *result = NULL, *raw = NULL;
    Py_buffer out_view;
    int have_out_view = 0;
    uint64_t start = 0;

    const char *texts[MAX_TEXTS];
    Py_ssize_t text_len[MAX_TEXTS];
    int n_texts = 0;
    long long counters[HEADER_COUNTERS];
    union { long long q; double d; unsigned char b; } scalars[MAX_FIELDS];

    PyObject *header = held[n_held++] = PyObject_GetAttr(msg, str_header);
    if (!header)
        goto fallback;
    for (int i = 0; i < HEADER_TEXTS; i++) {
        PyObject *v = held[n_held++] = PyObject_GetAttr(header, header_names[i]);
        if (!(texts[n_texts] = utf8_of(v, &text_len[n_texts])))
            goto fallback;
        n_texts++;
    }
    for (int i = 0; i < HEADER_COUNTERS; i++) {
        PyObject *v = held[n_held++] = PyObject_GetAttr(header, header_names[HEADER_TEXTS + i]);
        if (!int_of(v, &counters[i]))
            goto fallback;
    }
    for (int i = 0; i < L->n_scalars; i++) {
        PyObject *v = held[n_held++] = PyObject_GetAttr(msg, L->names[i]);
        if (!v)
            goto fallback;
        switch (L->codes[i]) {
        case 'q':
            if (!int_of(v, &scalars[i].q))
                goto fallback;
            break;
        case 'd':
            if (!PyFloat_CheckExact(v))
                goto fallback;
            scalars[i].d = PyFloat_AS_DOUBLE(v);
            break;
        case 'b':
            if (!PyBool_Check(v))
                goto fallback;
            scalars[i].b = v == Py_True;
            break;
        case 's':
            if (!(texts[n_texts] = utf8_of(v, &text_len[n_texts])))
                goto fallback;
            n_texts++;
            break;
        }
    }

    /* sizes: the fixed part, the strings, padding to 64, each tensor padded to 64 */
    uint64_t body = (uint64_t)L->fixed_size;
    for (int i = 0; i < n_texts; i++) {
        if ((uint64_t)text_len[i] > UINT32_MAX)
            goto fallback;
        body += (uint64_t)text_len[i];
    }
    uint64_t end = body + pad_of(body);
    if (end - 4 > UINT32_MAX)
        goto fallback;
    uint64_t total = end;
    int dtype_ids[MAX_FIELDS];
    for (int t = 0; t < L->n_tensors; t++) {
        PyObject *spec = PyTuple_GET_ITEM(tensor_specs, t);
        if (!PyTuple_Check(spec) || PyTuple_GET_SIZE(spec) != 2)
            goto fallback;
        long long dtype_id;
        if (!int_of(PyTuple_GET_ITEM(spec, 0), &dtype_id) || dtype_id < 1 || dtype_id > N_DTYPES)
            goto fallback;
        dtype_ids[t] = (int)dtype_id;
        if (PyObject_GetBuffer(PyTuple_GET_ITEM(spec, 1), &views[n_views], PyBUF_C_CONTIGUOUS | PyBUF_ND) < 0) {
            PyErr_Clear();
            goto fallback;
        }
        n_views++;
        Py_buffer *v = &views[t];
        if (v->ndim > MAX_DIMS || v->itemsize != ITEMSIZE[dtype_ids[t]])
            goto fallback;
        total += (uint64_t)v->len + pad_of((uint64_t)v->len);
    }

    uint8_t *out;
    if (alloc == Py_None) {
        raw = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)total);
        if (!raw)
            goto error;
        out = (uint8_t *)PyBytes_AS_STRING(raw);
    } else {
        raw = PyObject_CallFunction(alloc, "K", (unsigned long long)(total + ALIGN));
        if (!raw || PyObject_GetBuffer(raw, &out_view, PyBUF_WRITABLE | PyBUF_ND) < 0)
            goto error;
        have_out_view = 1; /* held until the bytes are written */
        start = (ALIGN - (uintptr_t)out_view.buf % ALIGN) % ALIGN;
        if (out_view.ndim != 1 || out_view.itemsize != 1 || (uint64_t)out_view.len < start + total) {
            PyErr_SetString(PyExc_ValueError, "pack: alloc must return a flat byte buffer of the size asked");
            goto error;
        }
        out = (uint8_t *)out_view.buf + start;
    }

    /* the fixed part */
    uint8_t *p = out;
    wr_u32(p, (uint32_t)(end - 4));
    p[4] = WIRE_VERSION;
    p[5] = (uint8_t)kind;
    p += PREFIX_SIZE;
    for (int i = 0; i < HEADER_COUNTERS; i++, p += 8)
        wr_u64(p, (uint64_t)counters[i]);
    for (int i = 0; i < HEADER_TEXTS; i++, p += 4)
        wr_u32(p, (uint32_t)text_len[i]);
    int next_text = HEADER_TEXTS;
    for (int i = 0; i < L->n_scalars; i++) {
        switch (L->codes[i]) {
        case 'q': wr_u64(p, (uint64_t)scalars[i].q); p += 8; break;
        case 'd': memcpy(p, &scalars[i].d, 8); p += 8; break;
        case 'b': *p++ = scalars[i].b; break;
        case 's': wr_u32(p, (uint32_t)text_len[next_text++]); p += 4; break;
        }
    }
    for (int t = 0; t < L->n_tensors; t++) {
        Py_buffer *v = &views[t];
        p[0] = (uint8_t)dtype_ids[t];
        p[1] = (uint8_t)v->ndim;
        for (int k = 0; k < MAX_DIMS; k++)
            wr_u64(p + 2 + 8 * k, k < v->ndim ? (uint64_t)v->shape[k] : 0);
        p += TENSOR_SLOT;
    }
    /* the strings and the header's padding */
    for (int i = 0; i < n_texts; i++) {
        memcpy(p, texts[i], (size_t)text_len[i]);
        p += text_len[i];
    }
    memset(p, 0, (size_t)(end - body));
    p = out + end;
    /* the tensors, each padded */
    for (int t = 0; t < L->n_tensors; t++) {
        size_t len = (size_t)views[t].len, pad = (size_t)pad_of(len);
        int finite = 1;
        Py_BEGIN_ALLOW_THREADS
        if (check)
            finite = copy_finite_bytes(dtype_ids[t], p, views[t].buf, len);
        else
            memcpy(p, views[t].buf, len);
        Py_END_ALLOW_THREADS
        if (!finite)
            goto fallback;
        memset(p + len, 0, pad);
        p += len + pad;
    }
    if (alloc == Py_None) {
        result = raw;
        raw = NULL;
    } else { /* a memoryview of [start, start + total), which keeps raw alive */
        PyObject *whole = PyMemoryView_FromObject(raw);
        PyObject *lo = PyLong_FromUnsignedLongLong(start), *hi = PyLong_FromUnsignedLongLong(start + total);
        PyObject *slice = (lo && hi) ? PySlice_New(lo, hi, NULL) : NULL;
        result = (whole && slice) ? PyObject_GetItem(whole, slice) : NULL;
        Py_XDECREF(whole);
        Py_XDECREF(lo);
        Py_XDECREF(hi);
        Py_XDECREF(slice);
    }
    goto done;

fallback:
    /* an exception from a field's getter (but an interrupt) is the reference's to raise again */
    if (PyErr_Occurred() && !PyErr_ExceptionMatches(PyExc_Exception))
        goto error;
    PyErr_Clear();
    result = Py_NewRef(Py_None);
    goto done;
error:
    Py_CLEAR(result);
done:
    if (have_out_view)
        PyBuffer_Release(&out_view);
    Py_XDECREF(raw);
    for (int i = 0; i < n_views; i++)
        PyBuffer_Release(&views[i]);
    for (int i = 0; i < n_held; i++)
        Py_XDECREF(held[i]);
    return result;
}

static PyObject *wire_pack(PyObject *self, PyObject *args) {
    PyObject *msg, *tensor_specs, *alloc;
    int kind;
    if (!PyArg_ParseTuple(args, "OiO!O", &msg, &kind, &PyTuple_Type, &tensor_specs, &alloc))
        return NULL;
    return pack_impl(msg, kind, tensor_specs, alloc, 0);
}

/* copy(msg, kind_id, tensors, alloc): what parse(pack(msg, kind_id, tensors, alloc)) returns, as
 * (memoryview, parsed), or None where either would. Delivery in one process: each tensor is checked
 * for finiteness while it is copied, block by block in L1, so the copy is not read a second time
 * (in a running chain that second read went to memory: BENCHMARKS.md); every other check of
 * `parse` runs on the bytes written. */
static PyObject *wire_copy(PyObject *self, PyObject *args) {
    PyObject *msg, *tensor_specs, *alloc;
    int kind;
    if (!PyArg_ParseTuple(args, "OiO!O", &msg, &kind, &PyTuple_Type, &tensor_specs, &alloc))
        return NULL;
    if (alloc == Py_None) {
        PyErr_SetString(PyExc_ValueError, "copy: alloc is required");
        return NULL;
    }
    PyObject *view = pack_impl(msg, kind, tensor_specs, alloc, 1);
    if (view == NULL || view == Py_None)
        return view;
    const Py_buffer *written = PyMemoryView_GET_BUFFER(view); /* the bytes, as the view holds them */
    PyObject *parsed = parse_bytes(written->buf, (uint64_t)written->len, 0, 0);
    if (parsed == NULL || parsed == Py_None) {
        Py_DECREF(view);
        return parsed;
    }
    return Py_BuildValue("(NN)", view, parsed);
}

/* ---- layouts */

/* whether `filled` can make instances of `cls`: a class whose instances `object.__new__` makes (no
 * `__new__` of its own) and that have a `__dict__` */
static int plain_class(PyObject *cls) {
    if (!PyType_Check(cls))
        return 0;
    PyTypeObject *tp = (PyTypeObject *)cls;
    return tp->tp_new == PyBaseObject_Type.tp_new &&
           (tp->tp_dictoffset != 0 || (tp->tp_flags & Py_TPFLAGS_MANAGED_DICT));
}

/* header_class(cls): the class of every message's header (messages.Header), set once */
static PyObject *wire_header_class(PyObject *self, PyObject *cls) {
    if (!plain_class(cls) || (header_cls && header_cls != cls)) {
        PyErr_SetString(PyExc_ValueError,
                        "header_class: a class without __new__ whose instances have a __dict__, the same one every time");
        return NULL;
    }
    if (!header_cls)
        header_cls = Py_NewRef(cls);
    Py_RETURN_NONE;
}

/* register(kind_id, cls, scalar_names, codes, n_tensors): a message kind's class and fixed part */
static PyObject *wire_register(PyObject *self, PyObject *args) {
    int kind, n_tensors;
    PyObject *cls, *names;
    const char *codes;
    if (!PyArg_ParseTuple(args, "iOO!si", &kind, &cls, &PyTuple_Type, &names, &codes, &n_tensors))
        return NULL;
    if (!plain_class(cls)) {
        PyErr_SetString(PyExc_ValueError, "register: a class without __new__ whose instances have a __dict__");
        return NULL;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(names);
    if (kind < 0 || kind >= MAX_KINDS || n > MAX_FIELDS || (Py_ssize_t)strlen(codes) != n ||
        n_tensors < 0 || n_tensors > MAX_FIELDS) {
        PyErr_SetString(PyExc_ValueError, "register: a layout outside the native codec's limits");
        return NULL;
    }
    Layout L = {.used = 1, .cls = cls, .n_scalars = (int)n, .n_tensors = n_tensors};
    L.fixed_size = PREFIX_SIZE + 8 * HEADER_COUNTERS + 4 * HEADER_TEXTS + (Py_ssize_t)n_tensors * TENSOR_SLOT;
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_ssize_t size = scalar_size(codes[i]);
        if (size < 0 || !PyUnicode_Check(PyTuple_GET_ITEM(names, i))) {
            PyErr_SetString(PyExc_ValueError, "register: scalar codes are q, d, b, s; names are str");
            return NULL;
        }
        L.codes[i] = codes[i];
        L.names[i] = PyTuple_GET_ITEM(names, i); /* borrowed until the layout is kept */
        L.fixed_size += size;
    }
    /* A kind's layout never changes once registered: `pack` and `parse` read it while Python code
     * (getters, the allocator) runs, which could otherwise register it again under them. */
    const Layout *old = &layouts[kind];
    if (old->used) {
        int same = old->cls == L.cls && old->n_scalars == L.n_scalars && old->n_tensors == L.n_tensors;
        for (int i = 0; same && i < L.n_scalars; i++) {
            int eq = PyUnicode_Compare(old->names[i], L.names[i]);
            if (eq == -1 && PyErr_Occurred())
                return NULL;
            same = old->codes[i] == L.codes[i] && eq == 0;
        }
        if (!same) {
            PyErr_SetString(PyExc_ValueError, "register: this kind has another layout already");
            return NULL;
        }
        return PyLong_FromSsize_t(old->fixed_size);
    }
    for (int i = 0; i < L.n_scalars; i++)
        Py_INCREF(L.names[i]);
    Py_INCREF(L.cls);
    layouts[kind] = L;
    return PyLong_FromSsize_t(L.fixed_size); /* codec.py checks it against its struct's size */
}

static PyMethodDef methods[] = {
    {"header_class", wire_header_class, METH_O, "header_class(cls)"},
    {"register", wire_register, METH_VARARGS, "register(kind_id, cls, scalar_names, codes, n_tensors)"},
    {"parse", wire_parse, METH_O, "parse(data) -> (kind, message, tensors, readonly) or None"},
    {"pack", wire_pack, METH_VARARGS, "pack(msg, kind_id, tensors, alloc) -> memoryview, bytes or None"},
    {"copy", wire_copy, METH_VARARGS, "copy(msg, kind_id, tensors, alloc) -> (memoryview, parsed) or None"},
    {"copy_finite", wire_copy_finite, METH_VARARGS, "copy_finite(dst, src, offset, dtype_id) -> bool"},
    {"finite", wire_finite, METH_VARARGS, "finite(buffer, dtype_id) -> bool"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    .m_base = PyModuleDef_HEAD_INIT,
    .m_name = "_wire",
    .m_doc = "Native fast path of the wire codec.",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__wire(void) {
    static const char *names[] = {"job_id", "sender", "receiver", "round", "step", "seq"};
    for (int i = 0; i < HEADER_COUNTERS + HEADER_TEXTS; i++)
        if (!(header_names[i] = PyUnicode_InternFromString(names[i])))
            return NULL;
    if (!(str_header = PyUnicode_InternFromString("header")) || !(empty_tuple = PyTuple_New(0)))
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m && (PyModule_AddIntConstant(m, "WIRE_VERSION", WIRE_VERSION) < 0 ||
              PyModule_AddIntConstant(m, "MAX_DIMS", MAX_DIMS) < 0 ||
              PyModule_AddIntConstant(m, "ALIGN", ALIGN) < 0 ||
              PyModule_AddIntConstant(m, "NATIVE_API", NATIVE_API) < 0)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
