/* FarmHash Fingerprint64 (farmhashna::Hash64), the hash of tf.strings.to_hash_bucket_fast.
 *
 * TensorFlow's categorical hashing is Fingerprint64(value) mod N; the C decoder computing the
 * same 64 bits lets it hand the model table rows instead of strings. Ported to C from
 * farmhash.cc (as shipped in pyfarmhash 0.5.1's sdist), keeping only the functions
 * Fingerprint64 uses; tests/serving/test_farmhash.py checks it against TensorFlow.
 *
 * Copyright (c) 2014 Google, Inc.
 *
 * Permission is hereby granted, free of charge, to any person obtaining a copy
 * of this software and associated documentation files (the "Software"), to deal
 * in the Software without restriction, including without limitation the rights
 * to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
 * copies of the Software, and to permit persons to whom the Software is
 * furnished to do so, subject to the following conditions:
 *
 * The above copyright notice and this permission notice shall be included in
 * all copies or substantial portions of the Software.
 *
 * THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
 * IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
 * FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
 * AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
 * LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
 * OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN
 * THE SOFTWARE.
 *
 * FarmHash, by Geoff Pike
 */
#ifndef ADPREDICT_FARMHASH_H
#define ADPREDICT_FARMHASH_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define FH_K0 0xc3a5c85c97cb3127ULL
#define FH_K1 0xb492b66fbe98f273ULL
#define FH_K2 0x9ae16a3b2f90404fULL

static inline uint64_t fh_fetch64(const char *p) {
    uint64_t r;
    memcpy(&r, p, sizeof r);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    r = __builtin_bswap64(r);
#endif
    return r;
}

static inline uint32_t fh_fetch32(const char *p) {
    uint32_t r;
    memcpy(&r, p, sizeof r);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    r = __builtin_bswap32(r);
#endif
    return r;
}

static inline uint64_t fh_rotate(uint64_t v, int shift) {
    return shift == 0 ? v : ((v >> shift) | (v << (64 - shift)));
}

static inline uint64_t fh_shift_mix(uint64_t v) { return v ^ (v >> 47); }

static inline uint64_t fh_len16(uint64_t u, uint64_t v, uint64_t mul) {
    uint64_t a = (u ^ v) * mul;
    a ^= a >> 47;
    uint64_t b = (v ^ a) * mul;
    b ^= b >> 47;
    return b * mul;
}

static inline uint64_t fh_len0to16(const char *s, size_t len) {
    if (len >= 8) {
        uint64_t mul = FH_K2 + len * 2;
        uint64_t a = fh_fetch64(s) + FH_K2;
        uint64_t b = fh_fetch64(s + len - 8);
        uint64_t c = fh_rotate(b, 37) * mul + a;
        uint64_t d = (fh_rotate(a, 25) + b) * mul;
        return fh_len16(c, d, mul);
    }
    if (len >= 4) {
        uint64_t mul = FH_K2 + len * 2;
        uint64_t a = fh_fetch32(s);
        return fh_len16(len + (a << 3), fh_fetch32(s + len - 4), mul);
    }
    if (len > 0) {
        uint8_t a = (uint8_t)s[0], b = (uint8_t)s[len >> 1], c = (uint8_t)s[len - 1];
        uint32_t y = (uint32_t)a + ((uint32_t)b << 8);
        uint32_t z = (uint32_t)len + ((uint32_t)c << 2);
        return fh_shift_mix(y * FH_K2 ^ z * FH_K0) * FH_K2;
    }
    return FH_K2;
}

static inline uint64_t fh_len17to32(const char *s, size_t len) {
    uint64_t mul = FH_K2 + len * 2;
    uint64_t a = fh_fetch64(s) * FH_K1;
    uint64_t b = fh_fetch64(s + 8);
    uint64_t c = fh_fetch64(s + len - 8) * mul;
    uint64_t d = fh_fetch64(s + len - 16) * FH_K2;
    return fh_len16(fh_rotate(a + b, 43) + fh_rotate(c, 30) + d, a + fh_rotate(b + FH_K2, 18) + c,
                    mul);
}

static inline uint64_t fh_len33to64(const char *s, size_t len) {
    uint64_t mul = FH_K2 + len * 2;
    uint64_t a = fh_fetch64(s) * FH_K2;
    uint64_t b = fh_fetch64(s + 8);
    uint64_t c = fh_fetch64(s + len - 8) * mul;
    uint64_t d = fh_fetch64(s + len - 16) * FH_K2;
    uint64_t y = fh_rotate(a + b, 43) + fh_rotate(c, 30) + d;
    uint64_t z = fh_len16(y, a + fh_rotate(b + FH_K2, 18) + c, mul);
    uint64_t e = fh_fetch64(s + 16) * mul;
    uint64_t f = fh_fetch64(s + 24);
    uint64_t g = (y + fh_fetch64(s + len - 32)) * mul;
    uint64_t h = (z + fh_fetch64(s + len - 24)) * mul;
    return fh_len16(fh_rotate(e + f, 43) + fh_rotate(g, 30) + h, e + fh_rotate(f + a, 18) + g,
                    mul);
}

/* WeakHashLen32WithSeeds(s, a, b): the pair (*first, *second). */
static inline void fh_weak32(const char *s, uint64_t a, uint64_t b, uint64_t *first,
                             uint64_t *second) {
    uint64_t w = fh_fetch64(s), x = fh_fetch64(s + 8), y = fh_fetch64(s + 16),
             z = fh_fetch64(s + 24);
    a += w;
    b = fh_rotate(b + a + z, 21);
    uint64_t c = a;
    a += x;
    a += y;
    b += fh_rotate(a, 44);
    *first = a + z;
    *second = b + c;
}

static inline uint64_t fh_fingerprint64(const char *s, size_t len) {
    const uint64_t seed = 81;
    if (len <= 16) {
        return fh_len0to16(s, len);
    }
    if (len <= 32) {
        return fh_len17to32(s, len);
    }
    if (len <= 64) {
        return fh_len33to64(s, len);
    }
    uint64_t x = seed;
    uint64_t y = seed * FH_K1 + 113;
    uint64_t z = fh_shift_mix(y * FH_K2 + 113) * FH_K2;
    uint64_t v1 = 0, v2 = 0, w1 = 0, w2 = 0, t;
    x = x * FH_K2 + fh_fetch64(s);
    const char *end = s + ((len - 1) / 64) * 64;
    const char *last64 = end + ((len - 1) & 63) - 63;
    do {
        x = fh_rotate(x + y + v1 + fh_fetch64(s + 8), 37) * FH_K1;
        y = fh_rotate(y + v2 + fh_fetch64(s + 48), 42) * FH_K1;
        x ^= w2;
        y += v1 + fh_fetch64(s + 40);
        z = fh_rotate(z + w1, 33) * FH_K1;
        fh_weak32(s, v2 * FH_K1, x + w1, &v1, &v2);
        fh_weak32(s + 32, z + w2, y + fh_fetch64(s + 16), &w1, &w2);
        t = z;
        z = x;
        x = t;
        s += 64;
    } while (s != end);
    uint64_t mul = FH_K1 + ((z & 0xff) << 1);
    s = last64;
    w1 += ((len - 1) & 63);
    v1 += w1;
    w1 += v1;
    x = fh_rotate(x + y + v1 + fh_fetch64(s + 8), 37) * mul;
    y = fh_rotate(y + v2 + fh_fetch64(s + 48), 42) * mul;
    x ^= w2 * 9;
    y += v1 * 9 + fh_fetch64(s + 40);
    z = fh_rotate(z + w1, 33) * mul;
    fh_weak32(s, v2 * mul, x + w1, &v1, &v2);
    fh_weak32(s + 32, z + w2, y + fh_fetch64(s + 16), &w1, &w2);
    t = z;
    z = x;
    x = t;
    return fh_len16(fh_len16(v1, w1, mul) + fh_shift_mix(y) * FH_K0 + z,
                    fh_len16(v2, w2, mul) + x, mul);
}

#endif
