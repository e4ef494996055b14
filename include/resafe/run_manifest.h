/* run_manifest: what `resafe train` records about each stage of a run directory, and how it
 * decides that a stage is up to date (README "resafe train").
 *
 * <stage_dir>/manifest.json, written last (temporary name + rename):
 *   {"stage": "dpo", "version": "0.1.0",
 *    "inputs": {"config": "<fnv64 hex of the sections that decide the stage>",
 *               "resafe_version": "0.1.0", "merge_modes": [...] (merge, eval, report),
 *               "upstream": {"<stage>": "<sha256 of its manifest.json>", ...},
 *               "files": {"<role>": <fingerprint>, ...}},
 *    "inputs_hash": "<sha256 of the inputs object printed unformatted>",
 *    "outputs": [{"path": "dpo/adapter.h5", "bytes": 1234, "sha256": "..."}, ...]}
 * A fingerprint of a file is {"bytes", "sha256"} for files up to 64 MiB; larger files (model
 * weights) are {"bytes", "mtime_ns", "ends_sha256"} (sha256 of the first and last MiB), so a
 * 13 GB checkpoint is not read on every run while any rewrite (new mtime) or resize is seen.
 * A directory's fingerprint is {"files": {"<relative name>": <fingerprint>}} over every regular
 * file below it (names with ".tmp." are left out). Paths are never part of a fingerprint:
 * a copied or hard-linked input with the same bytes (and times, for large files) is the same
 * input. Output paths are relative to the run directory. */
#ifndef RESAFE_RUN_MANIFEST_H
#define RESAFE_RUN_MANIFEST_H

#include <stdint.h>

struct cJSON;

#define RS_FINGERPRINT_FULL_MAX (64ll << 20)

/* Fingerprint of a file or directory; NULL + message when it is missing or unreadable. */
struct cJSON *rs_fingerprint(const char *path);
/* sha256 hex of j printed unformatted (canonical: cJSON keeps insertion order). */
void rs_json_sha256(const struct cJSON *j, char hex[65]);
/* Append {"path", "bytes", "sha256"} for every regular file below run_dir/rel (a file or a
 * directory), sorted by name, skipping manifest.json and pending.json. */
int rs_outputs_add(const char *run_dir, const char *rel, struct cJSON *outputs);
/* Write stage_dir/manifest.json (temp + rename). */
int rs_manifest_write(const char *stage_dir, const char *stage, const struct cJSON *inputs,
                      const struct cJSON *outputs);
/* 1 when stage_dir/manifest.json exists, records inputs_hash and every output it lists still
 * exists with its recorded size; 0 otherwise, with *why set to a short reason (static text). */
int rs_manifest_current(const char *stage_dir, const char *run_dir, const char *inputs_hash,
                        const char **why);
/* The manifest's parsed JSON (NULL when absent or unreadable; no message). */
struct cJSON *rs_manifest_load(const char *stage_dir);
/* sha256 hex of stage_dir/manifest.json's bytes; -1 when absent (no message). */
int rs_manifest_sha256(const char *stage_dir, char hex[65]);

#endif
