/* What _scan.c and _wire.c both check in a value: whether it is a number that certainly passes.
 *
 * The codec's Python checks accept any decimal TensorFlow's string-to-number parses within
 * float32's range; these C fast paths vouch only for short plain decimals and leave the rest
 * (exponents, longer numbers) to the Python checks.
 */
#ifndef ADPREDICT_VALUES_H
#define ADPREDICT_VALUES_H

#include <Python.h>

#define SAFE_DECIMAL_BYTES 38 /* a plain decimal this short is below 1e38 < FLT_MAX */

/* Whether s[0:n] (n >= 1) is [+-]?(digits[.digits*] | .digits), at most SAFE_DECIMAL_BYTES. */
static inline int safe_decimal(const char *s, Py_ssize_t n) {
    if (n > SAFE_DECIMAL_BYTES) {
        return 0;
    }
    Py_ssize_t i = 0;
    if (s[0] == '+' || s[0] == '-') {
        i = 1;
    }
    int digits = 0, dots = 0;
    for (; i < n; i++) {
        char c = s[i];
        if (c >= '0' && c <= '9') {
            digits++;
        } else if (c == '.' && dots == 0) {
            dots = 1;
        } else {
            return 0;
        }
    }
    return digits > 0;
}

#endif
