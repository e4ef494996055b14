/* quant_pack: the packed code layout shared by the CPU reference and the CUDA kernels.
 *
 * Layout (version 1): each row of W [rows, cols] is its own little-endian bit stream of
 * `bits`-bit codes along the input dimension: code c of the row occupies bits [c*bits,
 * (c+1)*bits) of the stream, least significant bit first. A row is padded with zero codes to a
 * multiple of 32 codes, so it is a whole number of 32-bit words: row_bytes = ceil(cols/32) * 4
 * * bits, and rows follow each other (packed is [rows, row_bytes] uint8, row-major).
 *   - 2/4/8 bits: 16/8/4 codes per 32-bit word, code j of a word in bits [j*bits, (j+1)*bits);
 *     a warp lane loading one word gets whole codes.
 *   - 3 bits: 32 codes in 3 consecutive words (96 bits); codes 10 and 21 straddle a word
 *     boundary. A kernel loads the three words of a 32-code tile and extracts with 64-bit shifts.
 * Groups (32/64/128 codes) therefore start on word boundaries, and a 128-column group is
 * 16 * bits bytes: one 128-bit load per 8 bits of width. Reasons: coalesced loads along the
 * reduction dimension, no code ever split across tiles of 32, the same scheme for every width. */
#include "resafe/quant.h"

#include <string.h>

size_t rs_qpack_row_bytes(int cols, int bits) {
    return (size_t)((cols + 31) / 32) * 4u * (size_t)bits;
}

void rs_qpack_row(uint8_t *dst, const uint8_t *codes, int cols, int bits) {
    size_t nbytes = rs_qpack_row_bytes(cols, bits);
    memset(dst, 0, nbytes);
    unsigned mask = (1u << bits) - 1u;
    for (int c = 0; c < cols; c++) {
        size_t bit = (size_t)c * (size_t)bits;
        unsigned v = (unsigned)codes[c] & mask;
        /* a code spans at most two bytes (bits <= 8) */
        dst[bit / 8] |= (uint8_t)(v << (bit % 8));
        if (bit % 8 + (size_t)bits > 8) dst[bit / 8 + 1] |= (uint8_t)(v >> (8 - bit % 8));
    }
}

void rs_qunpack_row(uint8_t *codes, const uint8_t *src, int cols, int bits) {
    unsigned mask = (1u << bits) - 1u;
    for (int c = 0; c < cols; c++) {
        size_t bit = (size_t)c * (size_t)bits;
        unsigned v = src[bit / 8] >> (bit % 8);
        if (bit % 8 + (size_t)bits > 8) v |= (unsigned)src[bit / 8 + 1] << (8 - bit % 8);
        codes[c] = (uint8_t)(v & mask);
    }
}

/* Padding codes of a row (past cols) are zero: part of the format, checked on load. */
int rs_qpack_row_padding_zero(const uint8_t *src, int cols, int bits) {
    size_t total = rs_qpack_row_bytes(cols, bits) * 8u;
    for (size_t bit = (size_t)cols * (size_t)bits; bit < total; bit++)
        if (src[bit / 8] >> (bit % 8) & 1u) return 0;
    return 1;
}
