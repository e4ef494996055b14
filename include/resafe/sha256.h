/* sha256: FIPS 180-4 SHA-256, for the provenance hashes of manifests. */
#ifndef RESAFE_SHA256_H
#define RESAFE_SHA256_H

#include <stddef.h>
#include <stdint.h>

typedef struct {
    uint32_t h[8];
    uint64_t len;
    uint8_t buf[64];
    size_t used;
} rs_sha256;

void rs_sha256_init(rs_sha256 *s);
void rs_sha256_update(rs_sha256 *s, const void *data, size_t n);
void rs_sha256_hex(rs_sha256 *s, char hex[65]); /* finishes s */
/* Hash of a whole file as 64 hex digits: 0, or -1 + message. */
int rs_sha256_file(const char *path, char hex[65]);

#endif
